"""Detections as a DICOM Comprehensive 3D SR (TID 1500 Measurement Report), and back.

Writing (:func:`write_dicom_sr`, via highdicom ``Comprehensive3DSR`` +
``MeasurementReport``, PS3.16 TID 1500 / TID 1410): one measurement group per
detection with

- tracking identifier = the finding's name (``F1``...) and a new tracking UID;
- finding type SCT 52988006 "Lesion" (SCT 27925004 "Nodule" when the card's label says
  nodule); algorithm identification = model name and version;
- the finding's centre as an SCOORD3D POINT in the source series' frame of reference
  (LPS mm, from ``coordinates_lps`` of the detection, else from the RAS ``coordinates``);
- measurements: SCT 81827009 "Diameter" (mm), SCT 118565006 "Volume" (mm3),
  DCM 111012 "Certainty of Finding" = detection confidence (0..1, UCUM "1"),
  DCM 111047 "Probability of cancer" = calibrated malignancy score when present;
- the risk category as a qualitative evaluation coded in the private scheme
  ``99MEDINFER`` (name ``risk-category`` "Risk category", value = the category name).

The SR references the source series (evidence: every source image). Reading back:
:func:`read_dicom_sr` returns the findings with their LPS points and measurements.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medinfer.errors import InvalidImageError
from medinfer.volume import Volume

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from medinfer.models.card import ModelCard

__all__ = ["read_dicom_sr", "read_dicom_sr_volume", "write_dicom_sr"]

PRIVATE_SCHEME = "99MEDINFER"


def _lps(det: Mapping[str, Any]) -> list[float]:
    if "coordinates_lps" in det:
        return [float(v) for v in det["coordinates_lps"]]
    x, y, z = (float(v) for v in det["coordinates"])
    return [-x, -y, z]


def write_dicom_sr(
    detections: Sequence[Mapping[str, Any]],
    source: str | os.PathLike[str] | Sequence[Dataset],
    card: ModelCard,
    path: str | os.PathLike[str],
    *,
    series_uid: str | None = None,
    series_number: int | None = None,
    series_description: str | None = None,
) -> Path:
    """Write detections as a TID 1500 Comprehensive 3D SR of the source series.

    Parameters
    ----------
    detections : finding dicts as in ``<case>_detections.json``
        (:meth:`medinfer.postprocess.detection.Finding.to_dict`): ``name``,
        ``coordinates_lps`` (or RAS ``coordinates``) in mm, ``diameter_mm``,
        ``confidence``, ``properties.volume_mm3``, ``triage.malignancy_score`` /
        ``triage.risk_category`` (optional).
    source : the source series folder (or one file) or its Datasets (single-frame).
    card : model card (model name and version).
    path : output file (written atomically).
    series_uid, series_number, series_description : as in
        :func:`medinfer.io.dicom_seg.write_dicom_seg` (number default: source + 3000,
        description ``"SR <model> <version>"``).

    Raises
    ------
    InvalidImageError
        No usable source series.
    SeriesSelectionError
        Several series and no ``series_uid``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medinfer._atomic import atomic_path
    from medinfer.io.dicom_seg import derived_series, load_source_datasets

    datasets = load_source_datasets(source, series_uid)
    ds0 = datasets[0]
    for_uid = str(ds0.get("FrameOfReferenceUID", ""))
    algo = hd.sr.AlgorithmIdentification(name=card.name, version=str(card.version))
    nodule = any("nodule" in s.name.lower() for s in card.labels.values())
    finding_type = codes.SCT.Nodule if nodule else codes.SCT.Lesion
    no_units = hd.sr.CodedConcept("1", "UCUM", "no units")
    groups = []
    for n, det in enumerate(detections, 1):
        name = str(det.get("name") or f"F{n}")
        measurements = [
            hd.sr.Measurement(name=codes.SCT.Diameter, value=float(det["diameter_mm"]),
                              unit=codes.UCUM.Millimeter, algorithm_id=algo),
        ]
        props = det.get("properties") or {}
        if props.get("volume_mm3") is not None:
            measurements.append(hd.sr.Measurement(
                name=codes.SCT.Volume, value=float(props["volume_mm3"]),
                unit=hd.sr.CodedConcept("mm3", "UCUM", "cubic millimeter"), algorithm_id=algo))
        measurements.append(hd.sr.Measurement(
            name=codes.DCM.CertaintyOfFinding, value=float(det["confidence"]), unit=no_units,
            algorithm_id=algo))
        triage = det.get("triage") or {}
        if triage.get("malignancy_score") is not None:
            measurements.append(hd.sr.Measurement(
                name=codes.DCM.ProbabilityOfCancer, value=float(triage["malignancy_score"]),
                unit=no_units, algorithm_id=algo))
        evaluations = []
        if triage.get("risk_category"):
            cat = str(triage["risk_category"])[:64]
            evaluations.append(hd.sr.QualitativeEvaluation(
                name=hd.sr.CodedConcept("risk-category", PRIVATE_SCHEME, "Risk category"),
                value=hd.sr.CodedConcept(cat[:16], PRIVATE_SCHEME, cat)))
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=name[:64]),
            referenced_region=hd.sr.ImageRegion3D(
                graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                graphic_data=np.asarray([_lps(det)], dtype=np.float64),
                frame_of_reference_uid=for_uid),
            finding_type=finding_type, algorithm_id=algo, measurements=measurements,
            qualitative_evaluations=evaluations or None))
    observer = hd.sr.ObservationContext(
        observer_person_context=None,
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=hd.UID(), name=card.name[:64], manufacturer_name="medinfer",
                model_name=card.name[:64])))
    report = hd.sr.MeasurementReport(
        observation_context=observer, procedure_reported=codes.LN.CTUnspecifiedBodyRegion
        if str(ds0.get("Modality", "")) == "CT" else codes.SCT.ImagingProcedure,
        imaging_measurements=groups or None, referenced_images=datasets)
    number, description = derived_series(ds0, card, "SR", 3000, series_number,
                                         series_description)
    sr = hd.sr.Comprehensive3DSR(
        evidence=datasets, content=report, series_instance_uid=hd.UID(),
        series_number=number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medinfer",
        is_complete=True, is_final=False)
    sr.SeriesDescription = description
    out = Path(path)
    with atomic_path(out) as tmp:
        sr.save_as(tmp)
    return out


def read_dicom_sr(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Findings of a TID 1500 SR written by :func:`write_dicom_sr` (or a compatible one).

    Returns
    -------
    list of dict
        Per measurement group: ``name`` (tracking identifier), ``point_lps`` (3 floats,
        mm, or None), ``frame_of_reference_uid``, ``measurements`` (code meaning ->
        ``{"value", "unit"}``), ``evaluations`` (meaning -> value meaning).

    Raises
    ------
    InvalidImageError
        Not a readable SR measurement report.
    """
    import highdicom as hd
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    try:
        sr = hd.sr.srread(p)
        groups = sr.content.get_planar_roi_measurement_groups()  # type: ignore[attr-defined]
    except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError,
            TypeError) as exc:
        raise InvalidImageError(f"{p}: not a readable TID 1500 SR ({exc})") from None
    out = []
    for g in groups:
        roi = g.roi
        point = None
        for_uid = None
        if roi is not None and hasattr(roi, "value"):
            data = np.asarray(roi.value, dtype=np.float64).reshape(-1, 3)
            point = [float(v) for v in data[0]]
            for_uid = str(getattr(roi, "ReferencedFrameOfReferenceUID", ""))
        out.append({
            "name": str(g.tracking_identifier or ""),
            "point_lps": point,
            "frame_of_reference_uid": for_uid,
            "measurements": {m.name.meaning: {"value": float(m.value),
                                              "unit": m.unit.value}
                             for m in g.get_measurements()},
            "evaluations": {e.name.meaning: e.value.meaning
                            for e in g.get_qualitative_evaluations()},
        })
    return out


def read_dicom_sr_volume(
    path: str | os.PathLike[str],
    *,
    reference: str | os.PathLike[str] | Volume,
    series_uid: str | None = None,
) -> Volume:
    """SR findings as a label Volume on the reference grid: finding n is value n at the
    voxel nearest to its point (points outside the grid are skipped).

    ``meta["findings"]`` holds :func:`read_dicom_sr`'s list.
    """
    from medinfer.io.dicom_seg import reference_volume

    findings = read_dicom_sr(path)
    ref = reference_volume(reference, series_uid)
    arr = np.zeros(ref.spatial_shape, dtype=np.uint8 if len(findings) <= 255 else np.uint16)
    for n, f in enumerate(findings, 1):
        if f["point_lps"] is None:
            continue
        x, y, z = f["point_lps"]
        ijk = np.rint(ref.world_to_voxel([-x, -y, z])).astype(int)
        if np.all((ijk >= 0) & (ijk < np.array(ref.spatial_shape))):
            arr[tuple(ijk)] = n
    return Volume(arr, ref.affine, {"format": "dicom-sr", "source": str(path),
                                    "findings": findings})
