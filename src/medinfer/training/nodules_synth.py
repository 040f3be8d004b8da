"""Synthetic lesions inserted into a real head CT: the data of the ``demo-nodules`` model.

The lesion model is fixed (issue 4) so that anyone can test a detector against it:

* solid ellipsoids with axis ratio (shortest / longest semi-axis) in 0.7-1.0 and a random
  orientation;
* equivalent diameter ``d = 2 (a b c)^(1/3)`` drawn uniformly from 4-25 mm;
* uniform density drawn uniformly from 70-140 HU (the lesion *replaces* the tissue);
* edges blurred by a Gaussian of sigma = 0.6 mm;
* Gaussian noise with sigma drawn uniformly from 3-10 HU added to the whole scan;
* placed fully inside brain tissue: every atlas voxel within the lesion's bounding sphere
  plus a 1.5 mm margin has a value in 15-60 HU (checked with a Euclidean distance
  transform of the tissue mask);
* 0-8 lesions per scan, non-overlapping: bounding spheres are at least 4 mm apart.

Scans are rendered on any voxel grid (any orientation, anisotropic spacing 0.6-2 mm). The
anatomy is the CT atlas resampled with trilinear interpolation (value 0 outside). A scanner
integrates over its voxel, so the edge profile of the rendered lesion is a Gaussian whose
variance along the surface normal ``n`` is ``0.6^2 + sum_a (n . u_a)^2 s_a^2 / 12`` (the
lesion blur plus the box point-spread function of the voxel, axes ``u_a``, spacing ``s_a``
mm, approximated by its variance). The signed distance to the ellipsoid surface is the
first-order approximation ``d = (q - 1) / |grad q|`` with ``q`` the normalised radius, and
the edge profile is that of a Gaussian-blurred ball of the equivalent radius ``R`` evaluated at
radius ``R + d`` (closed form), so the occupancy fraction integrates to the lesion volume.

This module is for the demo model and its tests only: the model it trains detects
**synthetic lesions only** and has no clinical meaning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage, special

from medinfer.volume import Volume

#: lesion model constants (issue 4)
DIAMETER_RANGE_MM = (4.0, 25.0)
AXIS_RATIO_RANGE = (0.7, 1.0)
DENSITY_RANGE_HU = (70.0, 140.0)
EDGE_SIGMA_MM = 0.6
NOISE_RANGE_HU = (3.0, 10.0)
TISSUE_RANGE_HU = (15.0, 60.0)
MAX_LESIONS = 8
#: margin (mm) between the lesion bounding sphere and non-tissue voxels
TISSUE_MARGIN_MM = 1.5
#: minimum gap (mm) between the bounding spheres of two lesions
LESION_GAP_MM = 4.0


@dataclass(frozen=True)
class SyntheticLesion:
    """One ellipsoidal lesion in world space.

    Attributes
    ----------
    center : (3,) float64, RAS+ mm.
    radii : (3,) float64, semi-axes in mm.
    rotation : (3, 3) float64, columns are the semi-axis directions in RAS+.
    density_hu : lesion density in HU.
    """

    center: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray
    density_hu: float

    @property
    def volume_mm3(self) -> float:
        """Ellipsoid volume ``4/3 pi a b c`` in mm^3."""
        return float(4.0 / 3.0 * math.pi * np.prod(self.radii))

    @property
    def diameter_mm(self) -> float:
        """Equivalent-sphere diameter ``2 (a b c)^(1/3)`` in mm."""
        return float(2.0 * np.prod(self.radii) ** (1.0 / 3.0))

    @property
    def bounding_radius_mm(self) -> float:
        """Longest semi-axis in mm."""
        return float(np.max(self.radii))

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly description (RAS+ mm, mm, HU)."""
        return {
            "center": [float(v) for v in self.center],
            "radii": [float(v) for v in self.radii],
            "diameter_mm": self.diameter_mm,
            "volume_mm3": self.volume_mm3,
            "density_hu": float(self.density_hu),
        }


@dataclass
class SyntheticScan:
    """A rendered scan with its ground truth.

    Attributes
    ----------
    image : Volume, int16 HU, shape ``(1, I, J, K)``.
    fraction : Volume, float32 in [0, 1], lesion occupancy fraction on the same grid.
    lesions : the inserted lesions.
    noise_sigma_hu : the noise standard deviation used.
    """

    image: Volume
    fraction: Volume
    lesions: list[SyntheticLesion] = field(default_factory=list)
    noise_sigma_hu: float = 0.0


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly distributed random 3-D rotation matrix (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))[np.newaxis, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


class LesionAtlas:
    """The head CT atlas with a tissue distance map for lesion placement.

    Parameters
    ----------
    ct : Volume of the head CT (HU), e.g. ``tests/data/ct/ct_head_brain_atlas_1mm.nii.gz``.
    """

    def __init__(self, ct: Volume) -> None:
        self.ct = ct
        self.array = np.asarray(ct.array[0], dtype=np.float32)
        tissue = (self.array >= TISSUE_RANGE_HU[0]) & (self.array <= TISSUE_RANGE_HU[1])
        # distance (mm) from each tissue voxel to the nearest non-tissue voxel centre;
        # subtract half a voxel diagonal so that the whole bounding sphere is in tissue
        edt = ndimage.distance_transform_edt(tissue, sampling=tuple(ct.spacing))
        self.tissue_distance = np.asarray(edt, dtype=np.float32) - float(
            0.5 * np.linalg.norm(ct.spacing)
        )
        self._inv = np.linalg.inv(ct.affine)
        deep = np.argwhere(self.tissue_distance >= 2.0 + TISSUE_MARGIN_MM)
        self._cand_vox = deep
        self._cand_depth = self.tissue_distance[tuple(deep.T)]
        self._cand_world = ct.voxel_to_world(deep)

    def lesion_like_mask(self, min_hu: float = DENSITY_RANGE_HU[0],
                         min_diameter_mm: float = DIAMETER_RANGE_MM[0],
                         margin_mm: float = 2.0) -> np.ndarray:
        """Atlas voxels of host structures that look like lesions (bool, atlas grid).

        The head CT contains a few bright structures (calcifications, dense vessels) of
        ``>= min_hu`` HU whose 26-connected components reach an equivalent diameter of at
        least ``min_diameter_mm``: a detector of synthetic lesions legitimately fires on
        them. Evaluations treat predictions inside these components (grown by
        ``margin_mm``) as *irrelevant findings* — neither true nor false positives — as
        LUNA16 does for annotated non-nodule findings.
        """
        import cc3d

        bright = self.array >= min_hu
        labels = cc3d.connected_components(bright, connectivity=26)
        counts = np.bincount(labels.ravel())
        vox = float(abs(np.linalg.det(self.ct.affine[:3, :3])))
        min_vox = math.pi / 6.0 * min_diameter_mm**3 / vox
        keep = np.flatnonzero(counts >= min_vox)
        keep = keep[keep != 0]
        mask = np.isin(labels, keep)
        iters = int(math.ceil(margin_mm / float(np.min(self.ct.spacing))))
        if iters > 0 and mask.any():
            mask = ndimage.binary_dilation(mask, iterations=iters)
        return np.asarray(mask)

    def is_lesion_like(self, points_ras: npt.ArrayLike, mask: np.ndarray | None = None
                       ) -> np.ndarray:
        """For RAS+ mm points ``(N, 3)``: True where the nearest atlas voxel is in
        :meth:`lesion_like_mask` (points outside the atlas: False)."""
        m = self.lesion_like_mask() if mask is None else mask
        p = np.atleast_2d(np.asarray(points_ras, dtype=np.float64))
        vox = np.rint(p @ self._inv[:3, :3].T + self._inv[:3, 3]).astype(int)
        inside = np.all((vox >= 0) & (vox < np.array(m.shape)), axis=1)
        out = np.zeros(len(p), dtype=bool)
        out[inside] = m[tuple(vox[inside].T)]
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> LesionAtlas:
        """Load the atlas from a NIfTI file."""
        from medinfer.io import load

        return cls(load(path))

    def brain_center(self) -> np.ndarray:
        """RAS+ mm of the centroid of the tissue mask."""
        idx = np.argwhere(self.tissue_distance > 0)
        return self.ct.voxel_to_world(idx.mean(axis=0))

    def brain_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """RAS+ mm bounding box (min, max) of non-zero atlas voxels."""
        idx = np.argwhere(self.array != 0)
        pts = self.ct.voxel_to_world(np.stack([idx.min(axis=0), idx.max(axis=0)]))
        return pts.min(axis=0), pts.max(axis=0)

    def sample_lesions(
        self,
        rng: np.random.Generator,
        n: int | None = None,
        *,
        diameter_range: Sequence[float] = DIAMETER_RANGE_MM,
        region: tuple[np.ndarray, float] | None = None,
        max_tries: int = 200,
    ) -> list[SyntheticLesion]:
        """Draw ``n`` (random 0-8 if None) non-overlapping lesions inside brain tissue.

        Parameters
        ----------
        region : optional ``(center RAS mm, radius mm)``: lesion centres lie in this ball.
        """
        if n is None:
            n = int(rng.integers(0, MAX_LESIONS + 1))
        lesions: list[SyntheticLesion] = []
        cand_vox, cand_depth = self._cand_vox, self._cand_depth
        if region is not None:
            c0, rad = region
            inside = np.sum((self._cand_world - np.asarray(c0)) ** 2, axis=1) <= rad**2
            cand_vox, cand_depth = cand_vox[inside], cand_depth[inside]
        for _ in range(n):
            for _try in range(max_tries):
                d = float(rng.uniform(diameter_range[0], diameter_range[1]))
                ratios = np.array([1.0, rng.uniform(*AXIS_RATIO_RANGE),
                                   rng.uniform(*AXIS_RATIO_RANGE)])
                radii = ratios * (d / 2.0) / float(np.prod(ratios) ** (1.0 / 3.0))
                rmax = float(radii.max())
                cand = cand_vox[cand_depth >= rmax + TISSUE_MARGIN_MM]
                if len(cand) == 0:
                    continue
                vox = cand[rng.integers(len(cand))] + rng.uniform(-0.5, 0.5, size=3)
                center = self.ct.voxel_to_world(vox)
                # the jittered centre must still be deep enough (trilinear lookup)
                depth = ndimage.map_coordinates(self.tissue_distance, vox[:, None], order=1)[0]
                if depth < rmax + TISSUE_MARGIN_MM:
                    continue
                if any(
                    np.linalg.norm(center - les.center)
                    < rmax + les.bounding_radius_mm + LESION_GAP_MM
                    for les in lesions
                ):
                    continue
                lesions.append(
                    SyntheticLesion(center, radii, random_rotation(rng),
                                    float(rng.uniform(*DENSITY_RANGE_HU)))
                )
                break
        return lesions


def grid_points(affine: npt.ArrayLike, shape: Sequence[int]) -> np.ndarray:
    """RAS+ mm of all voxel centres of a grid, shape ``(I, J, K, 3)``, float64."""
    a = np.asarray(affine, dtype=np.float64)
    ii, jj, kk = np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij")
    ijk = np.stack([ii, jj, kk], axis=-1)
    return ijk @ a[:3, :3].T + a[:3, 3]


def lesion_fraction(
    lesion: SyntheticLesion, affine: npt.ArrayLike, shape: Sequence[int],
    edge_sigma_mm: float = EDGE_SIGMA_MM,
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Occupancy fraction of one lesion on a grid, computed in its bounding box only.

    Returns ``(slices, fraction)`` with ``fraction`` float32 of the box shape, or None
    when the lesion does not touch the grid.
    """
    a = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    dirs = a[:3, :3] / spacing
    reach = lesion.bounding_radius_mm + 4.0 * math.sqrt(
        edge_sigma_mm**2 + float(np.max(spacing)) ** 2 / 12.0) + float(np.max(spacing))
    inv = np.linalg.inv(a)
    c_vox = inv[:3, :3] @ lesion.center + inv[:3, 3]
    # half extent of a world ball of radius `reach` along each voxel axis
    half = reach * np.linalg.norm(inv[:3, :3], axis=1)
    lo = np.maximum(np.floor(c_vox - half).astype(int), 0)
    hi = np.minimum(np.ceil(c_vox + half).astype(int) + 1, np.asarray(shape))
    if np.any(hi <= lo):
        return None
    sl = (slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1])),
          slice(int(lo[2]), int(hi[2])))
    sub = a.copy()
    sub[:3, 3] = a[:3, :3] @ lo + a[:3, 3]
    x = grid_points(sub, hi - lo) - lesion.center
    y = (x @ lesion.rotation) / lesion.radii  # normalised ellipsoid coordinates
    q = np.linalg.norm(y, axis=-1)
    grad = (y / lesion.radii) @ lesion.rotation.T  # R D^-1 y (times 1/q below)
    gnorm = np.linalg.norm(grad, axis=-1)
    qs = np.maximum(q, 1e-6)
    gq = np.maximum(gnorm / qs, 1e-9)
    dist = (q - 1.0) / gq  # first-order signed distance in mm
    normal = grad / np.maximum(gnorm, 1e-12)[..., None]
    proj = normal @ dirs  # (…, 3): n . u_a
    var = edge_sigma_mm**2 + np.sum(proj**2 * (spacing**2 / 12.0), axis=-1)
    frac = _blurred_ball(np.maximum(lesion.diameter_mm / 2.0 + dist, 1e-3),
                         lesion.diameter_mm / 2.0, np.sqrt(var))
    return sl, np.clip(frac, 0.0, 1.0).astype(np.float32)


def _blurred_ball(rho: np.ndarray, radius: float, sigma: np.ndarray) -> np.ndarray:
    """A uniform ball of ``radius`` convolved with an isotropic Gaussian ``sigma``, at radius
    ``rho`` (all mm); the exact closed form, which keeps the integral equal to the volume."""
    s2 = np.sqrt(2.0) * sigma
    a = 0.5 * (special.erf((radius - rho) / s2) + special.erf((radius + rho) / s2))
    b = (sigma / rho) / np.sqrt(2.0 * np.pi) * (
        np.exp(-((rho - radius) ** 2) / (2.0 * sigma**2))
        - np.exp(-((rho + radius) ** 2) / (2.0 * sigma**2))
    )
    return np.asarray(a - b)


def sample_atlas(atlas: LesionAtlas, affine: npt.ArrayLike, shape: Sequence[int]) -> np.ndarray:
    """The atlas (HU) resampled trilinearly onto a grid, float32 ``(I, J, K)``, 0 outside."""
    pts = grid_points(affine, shape)
    vox = pts @ atlas._inv[:3, :3].T + atlas._inv[:3, 3]
    out = ndimage.map_coordinates(
        atlas.array, np.moveaxis(vox, -1, 0), order=1, mode="constant", cval=0.0
    )
    return np.asarray(out, dtype=np.float32)


def render_scan(
    atlas: LesionAtlas,
    lesions: Sequence[SyntheticLesion],
    affine: npt.ArrayLike,
    shape: Sequence[int],
    rng: np.random.Generator,
    noise_sigma_hu: float | None = None,
) -> SyntheticScan:
    """Render the atlas with lesions on a grid (affine voxel -> RAS+ mm, ``shape`` (I, J, K)).

    Returns a :class:`SyntheticScan` with an int16 HU image and the float32 fraction map.
    """
    shape = tuple(int(s) for s in shape)
    img = sample_atlas(atlas, affine, shape)
    frac_total = np.zeros(shape, dtype=np.float32)
    for les in lesions:
        res = lesion_fraction(les, affine, shape)
        if res is None:
            continue
        sl, f = res
        img[sl] = img[sl] * (1.0 - f) + les.density_hu * f
        frac_total[sl] = np.maximum(frac_total[sl], f)
    if noise_sigma_hu is None:
        noise_sigma_hu = float(rng.uniform(*NOISE_RANGE_HU))
    img = img + rng.normal(0.0, noise_sigma_hu, size=shape).astype(np.float32)
    arr = np.clip(np.rint(img), -32768, 32767).astype(np.int16)
    a = np.asarray(affine, dtype=np.float64)
    meta = {"modality": "CT", "synthetic": True}
    return SyntheticScan(Volume(arr, a, meta), Volume(frac_total, a, meta), list(lesions),
                         noise_sigma_hu)


def random_grid(
    rng: np.random.Generator,
    center: npt.ArrayLike,
    extent_mm: float | Sequence[float],
    spacing_range: Sequence[float] = (0.6, 2.0),
    *,
    rotation: np.ndarray | None = None,
    permute_flip: bool = True,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A random scan grid: any orientation, anisotropic spacing, covering a box.

    Parameters
    ----------
    center : RAS+ mm of the grid centre.
    extent_mm : edge length(s) of the covered box along the grid axes, mm.
    spacing_range : each axis spacing is drawn uniformly from this range, mm.
    rotation : direction cosines (columns); random if None.
    permute_flip : also randomly permute and flip the axes (non-RAS storage order).

    Returns
    -------
    affine : (4, 4) float64 voxel -> RAS+ mm; shape : (I, J, K).
    """
    rot = random_rotation(rng) if rotation is None else np.asarray(rotation, dtype=np.float64)
    if permute_flip:
        rot = rot[:, rng.permutation(3)] * rng.choice([-1.0, 1.0], size=3)[None, :]
    spacing = rng.uniform(spacing_range[0], spacing_range[1], size=3)
    ext = np.broadcast_to(np.asarray(extent_mm, dtype=np.float64), (3,))
    shape = tuple(int(max(4, math.ceil(e / s))) for e, s in zip(ext, spacing, strict=True))
    affine = np.eye(4)
    affine[:3, :3] = rot * spacing[None, :]
    half = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    affine[:3, 3] = np.asarray(center, dtype=np.float64) - affine[:3, :3] @ half
    return affine, (int(shape[0]), int(shape[1]), int(shape[2]))


def make_heldout_scan(
    atlas: LesionAtlas,
    rng: np.random.Generator,
    *,
    n_lesions: int | None = None,
    spacing_range: Sequence[float] = (0.6, 2.0),
    extent_mm: float | Sequence[float] = (150.0, 180.0, 130.0),
    diameter_range: Sequence[float] = DIAMETER_RANGE_MM,
) -> SyntheticScan:
    """A whole synthetic scan: random lesions, random oblique anisotropic grid over the brain.

    ``extent_mm`` is the box covered (along the grid axes before permutation), centred on the
    brain; lesion centres are kept in the central ball of radius 50 mm so that they lie
    inside the field of view whatever the rotation.
    """
    center = atlas.brain_center()
    lesions = atlas.sample_lesions(rng, n_lesions, diameter_range=diameter_range,
                                   region=(center, 50.0))
    rot = random_rotation(rng)
    affine, shape = random_grid(rng, center, extent_mm, spacing_range, rotation=rot)
    return render_scan(atlas, lesions, affine, shape, rng)
