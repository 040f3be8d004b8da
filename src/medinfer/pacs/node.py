"""The step both PACS front doors share: run a model on one received series folder."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

from medinfer.errors import InvalidImageError

__all__ = ["NON_IMAGE_MODALITIES", "default_options", "predict_series"]

log = logging.getLogger(__name__)

#: modalities of series that hold no image to run a model on
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "RTSTRUCT", "PR", "KO", "DOC", "REG", "RTPLAN",
                                  "RTDOSE", "RWV", "AU", "ECG"})


def default_options(model: str, output_format: str | None = None, seg_type: str = "binary",
                    seg_compression: str = "none") -> Any:
    """DICOM output options for a node: ``--output-format`` or, by default, ``dicom-seg`` for a
    segmentation model and ``dicom-sr`` for a detection model."""
    from medinfer.io.dicom_export import DicomOutputOptions
    from medinfer.models.card import Task
    from medinfer.models.loaders import resolve_model

    if output_format is None:
        card, _ = resolve_model(model)
        output_format = "dicom-sr" if card.task is Task.DETECTION else "dicom-seg"
    return DicomOutputOptions.from_cli(output_format, seg_type, seg_compression)


def _is_detection(model: str) -> bool:
    from medinfer.errors import MedinferError
    from medinfer.models.card import Task
    from medinfer.models.loaders import resolve_model

    try:
        card, _ = resolve_model(model)
    except MedinferError:  # nnU-Net folders, MONAI bundles: segmentation
        return False
    return card.task is Task.DETECTION


def predict_series(series_dir: Path, series_uid: str | None, model: str, out_dir: Path,
                   options: Any, *, device: str = "auto") -> list[Path]:
    """Run ``model`` on the series in ``series_dir``; return the DICOM result files.

    Raises
    ------
    InvalidImageError
        The series holds no image (non-image SOP class), or the model wrote no DICOM
        result (e.g. an empty label map).
    MedinferError
        Any bad input of the prediction (mixed geometry, ...).
    """
    from rich.console import Console

    from medinfer.inference.cli import run_predict

    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    quiet = Console(file=io.StringIO())
    config = None
    if _is_detection(model):  # the node needs the findings only, not figures and reports
        config = out_dir / ".node-detection.yaml"
        config.write_text("output:\n  formats: [json]\n", encoding="utf-8")
    run_predict([series_dir], model=model, output_dir=out_dir, series=series_uid, device=device,
                console=quiet, keep_going=False, num_workers=0, dicom=options, config=config)
    results = sorted(p for p in out_dir.glob("*.dcm") if not p.name.startswith("."))
    if not results:
        raise InvalidImageError(f"series {series_uid or series_dir}: the model produced no "
                                "DICOM result (empty label map or no findings to report)")
    log.info("series %s: %d result file(s) in %.1f s", series_uid, len(results),
             time.perf_counter() - t0)
    return results
