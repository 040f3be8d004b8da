"""DICOM outputs of ``medinfer predict``: which ones a case gets, and writing them.

``--output-format nifti|dicom-seg|rtstruct|dicom-sr|all`` (comma list). NIfTI is always
written. Default (no ``--output-format``): NIfTI, plus a DICOM SEG when the input is
DICOM. ``all`` = every format that applies (SR only for detection models; SEG and
RTSTRUCT only for segmentation models). With ``--save-probabilities`` and SEG output a
FRACTIONAL SEG of the probabilities is written too (``<case>_prob_seg.dcm``).

A DICOM output asked for a NIfTI input gives one warning per case (no source DICOM
headers) and NIfTI only - unless ``--dicom-reference DIR`` names the series the NIfTI came
from: then its grid must equal that series' grid (up to axis order and flips), else
:class:`~medinfer.errors.GeometryError` (exit 2).

Files per case: ``<case>_seg.dcm`` (SEG), ``<case>_prob_seg.dcm`` (FRACTIONAL SEG),
``<case>_rtstruct.dcm``, ``<case>_sr.dcm``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medinfer.errors import ConfigError, InvalidImageError, MedinferError, parse_enum

if TYPE_CHECKING:
    from medinfer.models.card import ModelCard
    from medinfer.prediction import Prediction
    from medinfer.volume import Volume

__all__ = [
    "CaseDicomOutputs",
    "DicomOutputOptions",
    "detection_cases",
    "OutputFormat",
    "parse_output_formats",
    "plan_case_outputs",
    "write_detection_outputs",
]

log = logging.getLogger(__name__)


class OutputFormat(StrEnum):
    """Values of ``--output-format``."""

    NIFTI = "nifti"
    DICOM_SEG = "dicom-seg"
    RTSTRUCT = "rtstruct"
    DICOM_SR = "dicom-sr"
    ALL = "all"


_DICOM_FORMATS = (OutputFormat.DICOM_SEG, OutputFormat.RTSTRUCT, OutputFormat.DICOM_SR)


def parse_output_formats(value: str | Sequence[str] | None) -> frozenset[OutputFormat] | None:
    """``"nifti,dicom-seg"`` (or a list of such strings) -> formats; ``None`` stays ``None``
    (the default). ``all`` expands to every format.

    Raises
    ------
    ConfigError
        An unknown format (the message lists the accepted ones) or an empty list.
    """
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    names = [n.strip() for v in items for n in v.replace(" ", ",").split(",") if n.strip()]
    if not names:
        raise ConfigError("--output-format: empty; choose from nifti, dicom-seg, rtstruct, "
                          "dicom-sr, all (comma list)")
    formats = {parse_enum(OutputFormat, n, "--output-format") for n in names}
    if OutputFormat.ALL in formats:
        formats = set(OutputFormat) - {OutputFormat.ALL}
    return frozenset(formats | {OutputFormat.NIFTI})


@dataclass(frozen=True)
class DicomOutputOptions:
    """The DICOM output options of ``medinfer predict`` (picklable).

    Attributes
    ----------
    formats : requested formats, or ``None`` for the default (SEG for DICOM inputs).
    seg_type : ``binary`` | ``labelmap`` (``--seg-type``).
    seg_compression : ``none`` | ``rle`` | ``jpeg2000`` | ``jpegls``.
    seg_metadata : label metadata file for every case (``--seg-metadata``); else a
        ``<case>.mitklabel.json`` / ``seg-metadata.json`` found beside each input.
    dicom_reference : the DICOM series a NIfTI input came from (``--dicom-reference``).
    """

    formats: frozenset[OutputFormat] | None = None
    seg_type: str = "binary"
    seg_compression: str = "none"
    seg_metadata: Path | None = None
    dicom_reference: Path | None = None
    series_uid: str | None = field(default=None, compare=False)

    @classmethod
    def from_cli(cls, output_format: str | Sequence[str] | None = None, seg_type: str = "binary",
                 seg_compression: str = "none", seg_metadata: Path | None = None,
                 dicom_reference: Path | None = None) -> DicomOutputOptions:
        """Validate the CLI values (``ConfigError`` naming the option on a bad one)."""
        from medinfer.io.dicom_seg import SegCompression, SegmentationType, read_label_metadata

        st = parse_enum(SegmentationType, seg_type, "--seg-type")
        if st is SegmentationType.FRACTIONAL:
            raise ConfigError("--seg-type: 'fractional' is written from probabilities; use "
                              "--save-probabilities with SEG output (choose binary or labelmap)")
        comp = parse_enum(SegCompression, seg_compression, "--seg-compression")
        if seg_metadata is not None:
            read_label_metadata(seg_metadata)  # fail before any inference
        if dicom_reference is not None and not Path(dicom_reference).exists():
            raise ConfigError(f"--dicom-reference: {dicom_reference}: no such file or folder")
        return cls(parse_output_formats(output_format), st.value, comp.value,
                   Path(seg_metadata) if seg_metadata else None,
                   Path(dicom_reference) if dicom_reference else None)

    def settings(self) -> dict[str, Any]:
        """JSON-serialisable form (for the ``--continue`` settings key)."""
        return {"formats": sorted(f.value for f in self.formats) if self.formats else None,
                "seg_type": self.seg_type, "seg_compression": self.seg_compression,
                "seg_metadata": str(self.seg_metadata) if self.seg_metadata else None,
                "dicom_reference": str(self.dicom_reference) if self.dicom_reference else None}

    def wants_sr(self) -> bool:
        """True when ``dicom-sr`` (or ``all``) was asked for."""
        return self.formats is not None and OutputFormat.DICOM_SR in self.formats

    def requested(self, dicom_input: bool) -> set[OutputFormat]:
        """DICOM formats asked for (explicitly, or the default for a DICOM input)."""
        if self.formats is None:
            return {OutputFormat.DICOM_SEG} if dicom_input else set()
        return {f for f in self.formats if f in _DICOM_FORMATS}


@dataclass
class CaseDicomOutputs:
    """The DICOM files planned for one case: ``paths`` (kind -> final path) and
    :meth:`write` (writes them to the temporary paths the caller renames at the end)."""

    paths: dict[str, Path] = field(default_factory=dict)
    _jobs: list[tuple[str, Callable[[Path], Any]]] = field(default_factory=list)

    def write(self, tmp: Mapping[str, Path]) -> None:
        """Write every planned file to ``tmp[kind]``."""
        for kind, job in self._jobs:
            job(tmp[kind])


def _source_of(case_path: Path, volume: Volume, dicom_input: bool,
               options: DicomOutputOptions) -> tuple[Path | None, str | None]:
    if dicom_input:
        return case_path, volume.meta.get("series_instance_uid") or None
    if options.dicom_reference is not None:
        return options.dicom_reference, options.series_uid
    return None, None


def _metadata_for(case_path: Path, options: DicomOutputOptions) -> Path | None:
    from medinfer.io.dicom_seg import find_label_metadata

    return options.seg_metadata or find_label_metadata(case_path)


def plan_case_outputs(out_dir: Path, name: str, case_path: Path, dicom_input: bool,
                      volume: Volume, pred: Prediction, card: ModelCard,
                      options: DicomOutputOptions | None) -> CaseDicomOutputs:
    """The DICOM outputs of a segmentation case (see the module docstring).

    Warnings (logged, one per case): DICOM output asked for a NIfTI input without
    ``--dicom-reference``; SR asked for a segmentation model; an empty label map (no SEG /
    RTSTRUCT can hold it); a default SEG whose source series cannot carry one.

    Raises
    ------
    GeometryError
        ``--dicom-reference`` names a series whose grid is not the input's.
    MedinferError
        Explicitly requested output that cannot be written (bad source series...).
    """
    import numpy as np

    from medinfer.io.dicom_seg import on_source_grid, source_grid

    opts = options or DicomOutputOptions()
    wanted = opts.requested(dicom_input)
    plan = CaseDicomOutputs()
    if not wanted:
        return plan
    source, series_uid = _source_of(case_path, volume, dicom_input, opts)
    what = ", ".join(sorted(f.value for f in wanted))
    if source is None:
        log.warning("%s: %s asked for, but the input is NIfTI and carries no source DICOM "
                    "headers; wrote NIfTI only (pass --dicom-reference DIR with the series "
                    "it came from)", name, what)
        return plan
    if OutputFormat.DICOM_SR in wanted and not {OutputFormat.DICOM_SEG,
                                                OutputFormat.RTSTRUCT} <= wanted:
        log.warning("%s: dicom-sr holds detections; model %s is a segmentation model, so no "
                    "SR is written", name, card.name)
    wanted.discard(OutputFormat.DICOM_SR)
    if not wanted:
        return plan
    explicit = opts.formats is not None
    try:
        if dicom_input and volume.meta.get("skipped_files"):
            # read with allow_missing_slices: reference only the slices that were read
            from medinfer.io.dicom_seg import load_source_datasets

            read = set(volume.meta.get("sop_instance_uids") or [])
            kept = [d for d in load_source_datasets(source, series_uid)
                    if str(d.get("SOPInstanceUID", "")) in read]
            ordered, geom = source_grid(kept, series_uid)
        else:
            ordered, geom = source_grid(source, series_uid)
        if not dicom_input:  # --dicom-reference: same grid, checked before anything is written
            on_source_grid(np.zeros(pred.label.spatial_shape, np.uint8), pred.label.affine,
                           geom, f"--dicom-reference {source}")
    except MedinferError as exc:
        if explicit or not dicom_input:
            raise
        log.warning("%s: no DICOM SEG written (%s)", name, exc)
        return plan
    if not np.any(pred.label.array):
        log.warning("%s: the label map is empty; no DICOM SEG/RTSTRUCT written (they need at "
                    "least one segment)", name)
        return plan
    metadata = _metadata_for(case_path, opts)

    if OutputFormat.DICOM_SEG in wanted:
        from medinfer.io.dicom_seg import write_dicom_seg

        plan.paths["dicom_seg"] = out_dir / f"{name}_seg.dcm"
        plan._jobs.append(("dicom_seg", lambda p: write_dicom_seg(
            pred.label, ordered, card, p, seg_type=opts.seg_type,
            compression=opts.seg_compression, metadata=metadata)))
        if pred.probabilities is not None:
            plan.paths["dicom_prob_seg"] = out_dir / f"{name}_prob_seg.dcm"
            comp = "none" if opts.seg_compression == "none" else opts.seg_compression
            plan._jobs.append(("dicom_prob_seg", lambda p: write_dicom_seg(
                pred.label, ordered, card, p, seg_type="fractional",
                probabilities=pred.probabilities, compression=comp, metadata=metadata,
                series_description=f"SEG prob {card.name} {card.version}")))
    if OutputFormat.RTSTRUCT in wanted:
        from medinfer.io.rtstruct import write_rtstruct

        plan.paths["rtstruct"] = out_dir / f"{name}_rtstruct.dcm"
        plan._jobs.append(("rtstruct", lambda p: write_rtstruct(
            pred.label, ordered, card, p, metadata=metadata)))
    return plan


def _is_dicom_input(path: Path) -> bool:
    from medinfer.io.sniff import ImageFormat, sniff_format

    try:
        return sniff_format(path) is ImageFormat.DICOM
    except InvalidImageError:
        return False


def detection_cases(inputs: Sequence[Path]) -> list[tuple[str, Path]]:
    """``(case name, input)`` pairs, named as :func:`medinfer.detection.predict_detection`
    names them (duplicates get ``_1``, ``_2``...)."""
    from medinfer.detection import case_name, collect_inputs

    seen: dict[str, int] = {}
    out = []
    for f in collect_inputs(inputs):
        case = case_name(f)
        if case in seen:
            seen[case] += 1
            case = f"{case}_{seen[case]}"
        else:
            seen[case] = 0
        out.append((case, Path(f)))
    return out


def write_detection_outputs(
    cases: Iterable[tuple[str, Path]],
    output_dir: Path,
    card: ModelCard,
    options: DicomOutputOptions | None,
    *,
    series_uid: str | None = None,
) -> dict[str, Path]:
    """Write ``<case>_sr.dcm`` from each case's ``<case>_detections.json``.

    Parameters
    ----------
    cases : ``(case name, input path)`` as the detection pipeline named them.
    output_dir : where the detection files are (and the SR goes).
    card : the detection model's card.
    options : DICOM output options (SR is written when ``dicom-sr`` or ``all`` is asked
        for; not by default).
    series_uid : ``--series`` for DICOM folders.

    Returns
    -------
    dict
        case name -> SR path written.

    Raises
    ------
    GeometryError
        ``--dicom-reference`` names a series whose grid is not the NIfTI input's.
    """
    from medinfer.io import load
    from medinfer.io.dicom_seg import on_source_grid, source_grid
    from medinfer.io.dicom_sr import write_dicom_sr

    opts = options or DicomOutputOptions()
    written: dict[str, Path] = {}
    for name, path in cases:
        dicom_input = _is_dicom_input(path)
        wanted = opts.requested(dicom_input) if opts.formats is not None else set()
        if OutputFormat.DICOM_SR not in wanted:
            if wanted:
                log.warning("%s: %s not written for a detection model (only dicom-sr)", name,
                            ", ".join(sorted(f.value for f in wanted)))
            continue
        if dicom_input:
            source, uid = path, series_uid
        elif opts.dicom_reference is not None:
            source, uid = opts.dicom_reference, None
            image = load(path)
            _, geom = source_grid(source, uid)
            import numpy as np

            on_source_grid(np.zeros(image.spatial_shape, np.uint8), image.affine, geom,
                           f"--dicom-reference {source}")
        else:
            log.warning("%s: dicom-sr asked for, but the input is NIfTI and carries no source "
                        "DICOM headers; no SR written (pass --dicom-reference DIR)", name)
            continue
        doc_path = output_dir / f"{name}_detections.json"
        if not doc_path.is_file():
            log.warning("%s: no %s (add json to output.formats); no SR written", name,
                        doc_path.name)
            continue
        doc = json.loads(doc_path.read_text(encoding="utf-8"))
        written[name] = write_dicom_sr(doc.get("detections", []), source, card,
                                       output_dir / f"{name}_sr.dcm", series_uid=uid)
    return written

