"""Heat map -> findings: peaks, per-finding properties, 3-D NMS, size / confidence filters.

All functions work on the **source grid** of the scan: the heat map is a float array
``(I, J, K)`` (values in [0, 1], higher = more likely a lesion) with the scan's affine
(voxel index ``(i, j, k, 1)`` -> RAS+ mm). Distances, diameters and volumes are in world
millimetres computed through the affine, so anisotropic spacing, axis permutations and
oblique (rotated) grids are handled exactly.

Pipeline (:func:`detect_findings`)
---------------------------------
1. **Peaks** (:func:`find_peaks`) above ``threshold``, at least ``min_distance_mm`` apart.
2. **Component** around each peak: the 26-connected component of
   ``heat >= segmentation_threshold`` that contains the peak (connected-components-3d).
3. **Properties** (:func:`finding_properties`): volume, equivalent-sphere diameter, centre,
   HU statistics, sphericity, confidence (``post_processing.confidence``: mean heat over
   the component, default, or the heat at the peak). With ``refine: centroid`` only the
   highest peak of each component is measured (the others would give the identical
   sphere and be removed by NMS anyway). At most ``max(10 * max_detections, 1000)``
   peaks are considered.
4. **NMS** (:func:`nms`) by IoU of the finding spheres (or cubes) in world space.
5. **Filters**: diameter in ``[min_diameter_mm, max_diameter_mm]``, confidence
   ``>= min_confidence``, at most ``max_detections`` (highest confidence first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medinfer.errors import ConfigError, GeometryError, parse_enum
from medinfer.postprocess.detection_config import (
    ConfidenceMethod,
    NmsShape,
    PeakMethod,
    PostProcessingSection,
    Refine,
    VolumeMethod,
)
from medinfer.volume import validate_affine

#: face-count surface areas are multiplied by this (see :func:`surface_area_mm2`)
FACE_AREA_CORRECTION = 2.0 / 3.0


@dataclass
class Finding:
    """One detected finding (all world values RAS+ mm).

    Attributes
    ----------
    peak_voxel : (3,) int, voxel index of the heat-map peak.
    center_voxel : (3,) float, continuous voxel coordinates of the finding centre.
    center_ras : (3,) float, RAS+ mm of the centre.
    diameter_mm : equivalent-sphere diameter ``(6 V / pi)^(1/3)``, mm.
    volume_mm3 : volume, mm^3.
    confidence : in [0, 1]: the mean heat over the finding's component (default) or the
        heat-map value at the peak (``post_processing.confidence``).
    mean_intensity, std_intensity : image statistics over the component (HU for CT), or
        None without an image.
    sphericity : ``pi^(1/3) (6 V)^(2/3) / A`` in (0, 1], see :func:`sphericity`.
    voxel_count : voxels in the component.
    malignancy_score, risk_category : triage (filled by calibration).
    """

    peak_voxel: np.ndarray
    center_voxel: np.ndarray
    center_ras: np.ndarray
    diameter_mm: float
    volume_mm3: float
    confidence: float
    mean_intensity: float | None = None
    std_intensity: float | None = None
    sphericity: float | None = None
    voxel_count: int = 0
    malignancy_score: float | None = None
    risk_category: str | None = None
    id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def center_lps(self) -> np.ndarray:
        """LPS mm of the centre (DICOM / ITK world frame): ``(-x, -y, z)`` of RAS."""
        return self.center_ras * np.array([-1.0, -1.0, 1.0])

    def to_dict(self) -> dict[str, Any]:
        """The finding as in ``<case>_detections.json`` (see ``detection.schema.json``)."""

        def _r(v: float | None, nd: int = 4) -> float | None:
            return None if v is None else round(float(v), nd)

        return {
            "id": int(self.id[1:]) - 1 if self.id[1:].isdigit() else 0,
            "name": self.id,
            "coordinates": [round(float(v), 3) for v in self.center_ras],
            "coordinates_lps": [round(float(v), 3) for v in self.center_lps],
            "coordinates_voxel": [int(np.floor(float(v) + 0.5)) for v in self.center_voxel],
            "coordinates_voxel_continuous": [round(float(v), 3) for v in self.center_voxel],
            "diameter_mm": round(float(self.diameter_mm), 3),
            "confidence": round(float(self.confidence), 5),
            "properties": {
                "volume_mm3": round(float(self.volume_mm3), 3),
                "mean_intensity": _r(self.mean_intensity, 3),
                "std_intensity": _r(self.std_intensity, 3),
                "sphericity": _r(self.sphericity, 4),
            },
            "triage": {
                "malignancy_score": _r(self.malignancy_score, 5),
                "risk_category": self.risk_category,
            },
        }


# ---------------------------------------------------------------------------- helpers
def _heat3d(heatmap: npt.ArrayLike) -> np.ndarray:
    h = np.asarray(heatmap)
    if h.ndim == 4 and h.shape[0] == 1:
        h = h[0]
    if h.ndim != 3:
        raise GeometryError(f"heatmap: expected shape (I, J, K) or (1, I, J, K), got {h.shape}")
    return np.asarray(h, dtype=np.float32)


def distance_footprint(affine: npt.ArrayLike, radius_mm: float) -> np.ndarray:
    """Boolean footprint of all voxel offsets ``d`` with world length ``|A d| <= radius_mm``.

    ``A`` is the 3x3 part of ``affine``, so anisotropic and oblique grids give the exact
    world-space ball. Shape ``(2 n_i + 1, 2 n_j + 1, 2 n_k + 1)``, centred.
    """
    a = validate_affine(affine)[:3, :3]
    inv = np.linalg.inv(a)
    # the ball of radius r spans at most r * |row_n of A^-1| voxels along axis n
    half = np.floor(radius_mm * np.linalg.norm(inv, axis=1) + 1e-9).astype(int)
    grids = np.meshgrid(*(np.arange(-h, h + 1) for h in half), indexing="ij")
    d = np.stack(grids, axis=-1).astype(np.float64)
    dist = np.linalg.norm(d @ a.T, axis=-1)
    return np.asarray(dist <= radius_mm + 1e-9)


def find_peaks(
    heatmap: npt.ArrayLike,
    affine: npt.ArrayLike,
    *,
    threshold: float = 0.5,
    min_distance_mm: float = 5.0,
    method: PeakMethod | str = PeakMethod.LOCAL_MAXIMA,
    max_peaks: int = 10000,
) -> list[tuple[tuple[int, int, int], float]]:
    """Peaks of a heat map, highest first.

    Parameters
    ----------
    heatmap : float array ``(I, J, K)`` on the grid of ``affine``.
    affine : (4, 4) voxel -> RAS+ mm.
    threshold : peaks have ``heat >= threshold``.
    min_distance_mm : kept peaks are more than this far apart (world mm).
    method : ``local_maxima`` — a voxel is a candidate if it is ``>= threshold`` and
        not smaller than any voxel within ``min_distance_mm`` (grey dilation with the
        world-space ball :func:`distance_footprint`); candidates are then taken in
        decreasing value (ties: lower flat index first) and one closer than or equal
        to ``min_distance_mm`` to an already kept peak is dropped (plateaus give one
        peak). ``nms`` — greedy non-maximum suppression of all voxels ``>= threshold``:
        repeatedly take the highest remaining voxel and remove every voxel within
        ``min_distance_mm`` of it (also picks shoulders of wide blobs that lie farther
        than ``min_distance_mm`` from the top).
    max_peaks : stop after this many peaks.

    Returns
    -------
    list of ``((i, j, k), value)``, value descending.

    Raises
    ------
    ConfigError
        Unknown method or negative ``min_distance_mm``.
    """
    heat = _heat3d(heatmap)
    m = parse_enum(PeakMethod, method, "post_processing.peak_method")
    if min_distance_mm < 0:
        raise ConfigError(f"min_distance_mm: must be >= 0, got {min_distance_mm}")
    aff = validate_affine(affine)
    fp = distance_footprint(aff, min_distance_mm)
    above = heat >= threshold
    if not above.any():
        return []
    if m is PeakMethod.LOCAL_MAXIMA:
        dil = ndimage.maximum_filter(heat, footprint=fp, mode="constant", cval=-np.inf)
        cand = np.flatnonzero((heat >= dil) & above)
    else:
        cand = np.flatnonzero(above)
    vals = heat.ravel()[cand]
    order = np.lexsort((cand, -vals))  # value descending, then flat index ascending
    cand, vals = cand[order], vals[order]
    ijk = np.stack(np.unravel_index(cand, heat.shape), axis=-1)
    world = ijk.astype(np.float64) @ aff[:3, :3].T
    kept: list[int] = []
    alive = np.ones(len(cand), dtype=bool)
    r2 = (min_distance_mm + 1e-9) ** 2
    for n in range(len(cand)):
        if not alive[n]:
            continue
        kept.append(n)
        if len(kept) >= max_peaks:
            break
        d2 = np.sum((world[n + 1:] - world[n]) ** 2, axis=1)
        alive[n + 1:] &= d2 > r2
    return [((int(ijk[n][0]), int(ijk[n][1]), int(ijk[n][2])), float(vals[n])) for n in kept]


def voxel_volume_mm3(affine: npt.ArrayLike) -> float:
    """Voxel volume ``|det A|`` in mm^3 (exact for oblique / sheared grids)."""
    return float(abs(np.linalg.det(validate_affine(affine)[:3, :3])))


def surface_area_mm2(mask: np.ndarray, affine: npt.ArrayLike) -> float:
    """Surface area (mm^2) of a binary voxel object, from its exposed voxel faces.

    Each exposed face normal to voxel axis ``n`` has the world area of the parallelogram
    spanned by the two other affine columns (``|a_j x a_k|``, exact for oblique grids).
    Counting faces over-estimates a smooth surface: for surface normals uniformly
    distributed on the sphere the mean of ``|n_x| + |n_y| + |n_z|`` is 3/2, so the
    face area is multiplied by :data:`FACE_AREA_CORRECTION` = 2/3 (the classical
    correction of voxel-face surface estimates; see Lindblad, "Surface area estimation of
    digitized 3D objects using weighted local configurations", Image Vis. Comput. 2005).
    """
    a = validate_affine(affine)[:3, :3]
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    total = 0.0
    for axis in range(3):
        j, k = [x for x in range(3) if x != axis]
        face = float(np.linalg.norm(np.cross(a[:, j], a[:, k])))
        faces = np.count_nonzero(np.diff(m.astype(np.int8), axis=axis))
        total += faces * face
    return total * FACE_AREA_CORRECTION


def sphericity(volume_mm3: float, area_mm2: float) -> float:
    """Wadell sphericity ``pi^(1/3) (6 V)^(2/3) / A`` (1 for a sphere), clipped to [0, 1]."""
    if area_mm2 <= 0:
        return 0.0
    s = math.pi ** (1.0 / 3.0) * (6.0 * volume_mm3) ** (2.0 / 3.0) / area_mm2
    return float(min(max(s, 0.0), 1.0))


def equivalent_diameter_mm(volume_mm3: float) -> float:
    """Diameter of the sphere of the same volume, ``(6 V / pi)^(1/3)`` mm."""
    return float((6.0 * max(volume_mm3, 0.0) / math.pi) ** (1.0 / 3.0))


def finding_properties(
    heat: np.ndarray,
    labels: np.ndarray,
    peak: tuple[int, int, int],
    confidence: float,
    affine: np.ndarray,
    image: np.ndarray | None,
    *,
    volume_method: VolumeMethod | str = VolumeMethod.SOFT,
    refine: Refine | str = Refine.CENTROID,
    soft_margin: int = 2,
    boxes: list[tuple[slice, ...] | None] | None = None,
    confidence_method: ConfidenceMethod | str = ConfidenceMethod.PEAK,
) -> Finding:
    """Properties of the finding at ``peak``.

    Parameters
    ----------
    heat : float32 ``(I, J, K)`` heat map.
    labels : int ``(I, J, K)`` connected components of ``heat >= segmentation_threshold``
        (0 = background).
    peak : voxel index of the peak; confidence : heat value there.
    affine : (4, 4) voxel -> RAS+ mm.
    image : scan intensities ``(I, J, K)`` (HU for CT) on the same grid, or None.
    volume_method : ``binary`` — voxel count of the component times the voxel volume
        ``|det A|``; ``soft`` — sum of the heat map over the component grown by
        ``soft_margin`` voxels into background (not into other components), times the
        voxel volume. For a heat map that is the lesion's occupancy fraction (the
        demo-nodules target) the soft sum is an unbiased volume that includes partial
        voxels at the edge. If the peak is below the segmentation threshold the
        component is the peak voxel alone.
    refine : ``centroid`` — heat-weighted centroid over the same voxels as the volume;
        ``peak`` — the peak voxel.
    boxes : ``scipy.ndimage.find_objects(labels)`` if already computed.
    confidence_method : ``peak`` — the finding's confidence is ``confidence`` (the heat at
        the peak); ``mean`` — the mean heat over the component (the peak voxel alone if
        the peak is below the segmentation threshold). The peak of a heat map trained on
        the lesion occupancy fraction saturates at 1 for every lesion larger than a few
        voxels, so it cannot rank findings; the component mean stays below 1 and grows
        with how clearly the whole finding stands out (higher for large, sharp,
        high-contrast findings, lower for small or doubtful ones).

    Returns
    -------
    Finding
        Diameter is the equivalent-sphere diameter ``(6 V / pi)^(1/3)``. Intensity
        statistics and sphericity use the binary component.
    """
    vm = parse_enum(VolumeMethod, volume_method, "post_processing.volume_method")
    rf = parse_enum(Refine, refine, "post_processing.refine")
    cm = parse_enum(ConfidenceMethod, confidence_method, "post_processing.confidence")
    vox_vol = voxel_volume_mm3(affine)
    lab = int(labels[peak])
    shape = heat.shape
    if lab == 0:
        lo = np.array(peak)
        hi = lo + 1
    else:
        if boxes is None:
            boxes = ndimage.find_objects(labels)
        box = boxes[lab - 1]
        if box is None:  # pragma: no cover - labels from cc3d are consecutive
            raise GeometryError(f"component {lab} has no voxels")
        lo = np.array([b.start for b in box])
        hi = np.array([b.stop for b in box])
    m = soft_margin if vm is VolumeMethod.SOFT else 0
    lo_c = np.maximum(lo - m, 0)
    hi_c = np.minimum(hi + m, shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo_c, hi_c, strict=True))
    h = heat[crop]
    lab_c = labels[crop]
    if lab == 0:
        comp = np.zeros(h.shape, dtype=bool)
        comp[tuple(np.array(peak) - lo_c)] = True
    else:
        comp = lab_c == lab
    if vm is VolumeMethod.SOFT:
        region = comp
        if m > 0:
            grown = ndimage.binary_dilation(comp, structure=np.ones((3, 3, 3), bool),
                                            iterations=m)
            region = grown & ((lab_c == 0) | comp)
        weights = np.clip(h, 0.0, None) * region
        volume = float(weights.sum()) * vox_vol
    else:
        weights = comp.astype(np.float64) * np.clip(h, 0.0, None)
        volume = float(np.count_nonzero(comp)) * vox_vol
    if rf is Refine.CENTROID and weights.sum() > 0:
        pts = np.argwhere(weights > 0)
        w = weights[tuple(pts.T)]
        center_vox = (pts * w[:, None]).sum(axis=0) / w.sum() + lo_c
    else:
        center_vox = np.array(peak, dtype=np.float64)
    aff = np.asarray(affine, dtype=np.float64)
    center_ras = aff[:3, :3] @ center_vox + aff[:3, 3]
    mean_i = std_i = None
    if image is not None:
        vals = np.asarray(image[crop], dtype=np.float64)[comp]
        mean_i, std_i = float(vals.mean()), float(vals.std())
    area = surface_area_mm2(comp, aff)
    sph = sphericity(float(np.count_nonzero(comp)) * vox_vol, area)
    if cm is ConfidenceMethod.MEAN:
        confidence = float(np.asarray(h, dtype=np.float64)[comp].mean())
    return Finding(
        peak_voxel=np.array(peak, dtype=int),
        center_voxel=center_vox,
        center_ras=center_ras,
        diameter_mm=equivalent_diameter_mm(volume),
        volume_mm3=volume,
        confidence=float(confidence),
        mean_intensity=mean_i,
        std_intensity=std_i,
        sphericity=sph,
        voxel_count=int(np.count_nonzero(comp)),
    )


# ------------------------------------------------------------------------------- NMS
def sphere_iou(c1: npt.ArrayLike, d1: float, c2: npt.ArrayLike, d2: float) -> float:
    """IoU of two balls (centres mm, diameters mm), from the exact lens volume."""
    r1, r2 = d1 / 2.0, d2 / 2.0
    d = float(np.linalg.norm(np.asarray(c1, float) - np.asarray(c2, float)))
    v1, v2 = 4.0 / 3.0 * math.pi * r1**3, 4.0 / 3.0 * math.pi * r2**3
    if v1 <= 0 or v2 <= 0 or d >= r1 + r2:
        return 0.0
    if d <= abs(r1 - r2):
        inter = min(v1, v2)
    else:
        inter = (math.pi * (r1 + r2 - d) ** 2
                 * (d * d + 2 * d * (r1 + r2) - 3 * (r1 - r2) ** 2) / (12.0 * d))
    return float(inter / (v1 + v2 - inter))


def box_iou(c1: npt.ArrayLike, d1: float, c2: npt.ArrayLike, d2: float) -> float:
    """IoU of two axis-aligned (RAS) cubes with edge = diameter, centred at the findings."""
    a, b = np.asarray(c1, float), np.asarray(c2, float)
    lo = np.maximum(a - d1 / 2.0, b - d2 / 2.0)
    hi = np.minimum(a + d1 / 2.0, b + d2 / 2.0)
    inter = float(np.prod(np.clip(hi - lo, 0.0, None)))
    union = d1**3 + d2**3 - inter
    return inter / union if union > 0 else 0.0


def nms(findings: Sequence[Finding], iou_threshold: float,
        shape: NmsShape | str = NmsShape.SPHERE) -> list[Finding]:
    """Greedy 3-D non-maximum suppression in world space.

    Findings are taken by decreasing confidence (stable); one whose IoU with an already
    kept finding is greater than ``iou_threshold`` is dropped. The IoU is that of the
    finding spheres (centre, equivalent diameter; :func:`sphere_iou`) or of axis-aligned
    RAS cubes of edge = diameter (:func:`box_iou`). Peaks in the same heat-map component
    have the same centre and diameter (IoU 1) and collapse to one finding.
    """
    s = parse_enum(NmsShape, shape, "post_processing.nms_shape")
    iou = sphere_iou if s is NmsShape.SPHERE else box_iou
    order = sorted(findings, key=lambda f: -f.confidence)
    kept: list[Finding] = []
    for f in order:
        if all(iou(f.center_ras, f.diameter_mm, k.center_ras, k.diameter_mm) <= iou_threshold
               for k in kept):
            kept.append(f)
    return kept


def detect_findings(
    heatmap: npt.ArrayLike,
    affine: npt.ArrayLike,
    image: npt.ArrayLike | None = None,
    params: PostProcessingSection | None = None,
) -> list[Finding]:
    """Run the whole post-processing on one heat map (see the module docstring).

    Parameters
    ----------
    heatmap : float ``(I, J, K)`` or ``(1, I, J, K)`` on the source grid.
    affine : (4, 4) voxel -> RAS+ mm of that grid.
    image : optional scan ``(I, J, K)`` / ``(1, I, J, K)`` (HU) for intensity statistics.
    params : the ``post_processing`` section (defaults if None).

    Returns
    -------
    Findings sorted by decreasing confidence with ids ``F01``, ``F02``... (``F001`` when
    there are more than 99). Triage is not filled (see :mod:`medinfer.postprocess.calibration`).
    """
    import cc3d

    p = params or PostProcessingSection()
    heat = _heat3d(heatmap)
    aff = validate_affine(affine)
    img = None
    if image is not None:
        img = _heat3d(image)
        if img.shape != heat.shape:
            raise GeometryError(f"image shape {img.shape} differs from heatmap {heat.shape}")
    peaks = find_peaks(heat, aff, threshold=p.threshold, min_distance_mm=p.min_distance_mm,
                       method=p.peak_method, max_peaks=max(10 * p.max_detections, 1000))
    labels = cc3d.connected_components(heat >= p.segmentation_threshold, connectivity=26)
    if parse_enum(Refine, p.refine, "post_processing.refine") is Refine.CENTROID:
        # with centroid refinement all peaks of one component give the same sphere (IoU 1),
        # so NMS would keep only the first (highest) one: drop the others before measuring
        seen: set[int] = set()
        unique = []
        for pk, val in peaks:
            lab = int(labels[pk])
            if lab == 0 or lab not in seen:
                unique.append((pk, val))
                seen.add(lab)
        peaks = unique
    boxes = ndimage.find_objects(labels) if peaks else []
    found = [
        finding_properties(heat, labels, pk, val, aff, img, volume_method=p.volume_method,
                           refine=p.refine, boxes=boxes, confidence_method=p.confidence)
        for pk, val in peaks
    ]
    if p.nms_enabled:
        found = nms(found, p.nms_iou, p.nms_shape)
    found = [
        f for f in found
        if f.diameter_mm >= p.min_diameter_mm
        and (p.max_diameter_mm is None or f.diameter_mm <= p.max_diameter_mm)
        and f.confidence >= p.min_confidence
    ]
    found = sorted(found, key=lambda f: -f.confidence)[: p.max_detections]
    width = 2 if len(found) <= 99 else len(str(len(found)))
    for n, f in enumerate(found, start=1):
        f.id = f"F{n:0{width}d}"
    return found
