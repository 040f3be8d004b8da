"""Simulated acquisitions: a bank of augmented training volumes on the model grid.

A scan reaches the network through :func:`medinfer.transforms.to_model_grid` (reorient,
resample linearly to the model spacing) and
:func:`medinfer.transforms.normalize_intensity`. Training on the source grid alone
teaches nothing about thick slices, obliquity or scanner intensities, so each item of the
bank is one *simulated acquisition* of a training case, brought to the model grid by the
same two engine functions the :class:`~medinfer.inference.Predictor` uses:

1. a random rotation (up to ``rotate_deg`` about each world axis) and a shift of the
   centre by up to ``shift_mm``;
2. an acquisition grid along the rotated axes with a random voxel size: isotropic
   (``spacing_mm`` range), thick slices along one axis (``thick_mm``) or anything in the
   ``spacing_mm``/``thick_mm`` ranges; the source is first sampled on a fine grid along the
   rotated axes (the source's smallest spacing), blurred with the slice profile (Gaussian,
   FWHM ``sqrt(s^2 - s_fine^2)`` along each acquisition axis) and then sampled on the
   acquisition grid (linear);
3. a field of view ``fov_margin_mm`` larger than the source on each side (zeros);
4. intensities as a scanner stores them: smooth multiplicative bias field, gamma,
   Gaussian or Rician noise, arbitrary scale and offset, rounded to integers
   (``intensity_prob`` of the items; the others keep clean intensities);
5. the engine's model grid and normalisation; the labels are sampled from the source
   straight onto the model grid (nearest neighbour, one interpolation only);
6. a mirror along world axis ``mirror_axis`` (0 = left-right) with probability
   ``mirror_prob`` (only for anatomy whose labels are not lateralised).

Item 0 of each case is the clean acquisition (no rotation, source spacing, no intensity
changes). Every item depends only on ``(seed, case index, item index)``.

Source: the acquisition model of the one-off ``demo-brain`` training script it replaces
(slice profile approximated by a Gaussian whose FWHM is the added voxel extent; Rician
noise = magnitude of a complex signal with Gaussian noise in both parts, Gudbjartsson &
Patz, MRM 1995).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medinfer.volume import Volume

log = logging.getLogger(__name__)

#: FWHM of a Gaussian in units of its standard deviation
_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


class AcquisitionSim(BaseModel):
    """``acquisition:`` section of ``train.yaml`` (see the module docstring).

    Attributes
    ----------
    bank : augmented volumes per training case (item 0 is the clean acquisition).
    rotate_deg : largest rotation about each world axis, degrees.
    shift_mm : largest shift of the acquisition centre per axis, mm.
    spacing_mm : in-plane / isotropic voxel size range, mm.
    thick_mm : slice thickness range of the thick axis, mm.
    fov_margin_mm : range of empty field of view added on each side, mm.
    intensity_prob : fraction of items with scanner intensity changes.
    bias_sd : largest standard deviation of the log bias field (4x4x4 control points).
    gamma_log : gamma = exp(u), u uniform in +-gamma_log.
    noise_sd : range of the noise standard deviation relative to the 99.5th percentile.
    scale : range of the stored intensity scale (log-uniform); offset up to 0.3 x scale.
    mirror_prob, mirror_axis : probability of a mirror along world axis ``mirror_axis``
        (0 = x = left-right) of image and labels; 0 disables it.
    """

    model_config = ConfigDict(extra="forbid")
    bank: int = Field(default=24, ge=1, le=10_000)
    rotate_deg: float = Field(default=20.0, ge=0.0, le=180.0)
    shift_mm: float = Field(default=5.0, ge=0.0)
    spacing_mm: tuple[float, float] = (0.8, 2.0)
    thick_mm: tuple[float, float] = (1.5, 2.5)
    fov_margin_mm: tuple[float, float] = (0.0, 40.0)
    intensity_prob: float = Field(default=1.0, ge=0.0, le=1.0)
    bias_sd: float = Field(default=0.35, ge=0.0, le=2.0)
    gamma_log: float = Field(default=0.4, ge=0.0, le=2.0)
    noise_sd: tuple[float, float] = (0.005, 0.06)
    scale: tuple[float, float] = (60.0, 4000.0)
    mirror_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    mirror_axis: int = Field(default=0, ge=0, le=2)


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return np.asarray(Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix())


def _corners(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    idx = np.array([[a, b, c] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1)
                    for c in (0, shape[2] - 1)], dtype=np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _acq_spacing(sim: AcquisitionSim, rng: np.random.Generator) -> np.ndarray:
    kind = rng.uniform()
    if kind < 0.25:  # isotropic
        return np.full(3, rng.uniform(*sim.spacing_mm))
    if kind < 0.75:  # thick slices along one axis
        sp = rng.uniform(sim.spacing_mm[0], min(sim.spacing_mm[1], sim.thick_mm[0]), size=3)
        sp[rng.integers(3)] = rng.uniform(*sim.thick_mm)
        return sp
    return rng.uniform(sim.spacing_mm[0], max(sim.spacing_mm[1], sim.thick_mm[1]), size=3)


def _intensity(arr: np.ndarray, sim: AcquisitionSim, rng: np.random.Generator) -> np.ndarray:
    """Bias field, gamma, noise, scale/offset of one channel (float32, integers stored)."""
    from scipy.ndimage import zoom

    pos = arr[arr > 0]
    peak = float(np.percentile(pos, 99.5)) if pos.size else 1.0
    x = np.clip(arr / max(peak, 1e-6), 0.0, None)
    coarse = rng.normal(0.0, rng.uniform(0.0, sim.bias_sd), size=(4, 4, 4))
    field = zoom(coarse, [n / 4.0 for n in x.shape], order=1, mode="nearest",
                 grid_mode=True)
    x = x * np.exp(field[tuple(slice(0, n) for n in x.shape)])
    x = x ** float(np.exp(rng.uniform(-sim.gamma_log, sim.gamma_log)))
    u = rng.uniform()
    sd = rng.uniform(*sim.noise_sd)
    if u < 0.35:  # Gaussian noise in the object
        x = x + rng.normal(0.0, sd, size=x.shape) * (x > 0)
    elif u < 0.7:  # Rician (magnitude) noise everywhere
        x = np.sqrt((x + rng.normal(0.0, sd, size=x.shape)) ** 2
                    + rng.normal(0.0, sd, size=x.shape) ** 2)
    scale = float(np.exp(rng.uniform(math.log(sim.scale[0]), math.log(sim.scale[1]))))
    offset = float(rng.uniform(0.0, 0.3)) * scale if rng.uniform() < 0.4 else 0.0
    return np.rint(np.clip(x, 0.0, None) * scale + offset).astype(np.float32)


def simulate(image: Volume, label: Volume, sim: AcquisitionSim, rng: np.random.Generator,
             *, orientation: str | None, spacing: Any, normalization: dict[str, Any],
             clean: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One simulated acquisition of a case, on the model grid.

    Parameters
    ----------
    image : Volume ``(C, I, J, K)`` on the case's source grid (affine voxel -> RAS+ mm).
    label : Volume ``(1, I, J, K)`` integer labels on the same grid.
    sim : the simulation settings.
    rng : the only source of randomness.
    orientation, spacing, normalization : the model's input contract (as
        :func:`medinfer.transforms.to_model_grid` and
        :func:`medinfer.transforms.normalize_intensity` take them).
    clean : the case on its own grid (no rotation, shift, voxel size change, intensity
        change or mirror) in a field of view larger by the middle of ``fov_margin_mm``.

    Returns
    -------
    (image, label, affine)
        float32 ``(C, I', J', K')`` normalised, uint8/int ``(1, I', J', K')``, and the
        model-grid affine (voxel -> RAS+ mm).
    """
    from medinfer.transforms import normalize_intensity, resample_to_grid, to_model_grid

    src_aff = np.asarray(image.affine, dtype=np.float64)
    if clean:  # the case as it is, in a larger field of view
        acq, acq_aff = np.asarray(image.array, dtype=np.float32), src_aff.copy()
        acq_sp = np.linalg.norm(src_aff[:3, :3], axis=0)
    else:
        acq, acq_aff, acq_sp = _acquire(image, sim, rng)
    margin = (np.full((3, 2), float(np.mean(sim.fov_margin_mm))) if clean
              else rng.uniform(*sim.fov_margin_mm, size=(3, 2)))
    pad = np.floor(margin / acq_sp[:, None]).astype(int)
    acq = np.pad(acq, [(0, 0)] + [(int(a), int(b)) for a, b in pad])
    acq_aff[:3, 3] = acq_aff[:3, 3] - acq_aff[:3, :3] @ pad[:, 0]
    if not clean and rng.uniform() < sim.intensity_prob:
        acq = np.stack([_intensity(ch, sim, rng) for ch in acq])
    on_grid, _ = to_model_grid(Volume(acq, acq_aff, {}), orientation, spacing,
                               interpolation="linear")
    img = np.asarray(normalize_intensity(on_grid, normalization).array, dtype=np.float32)
    lab = np.asarray(resample_to_grid(label, on_grid.spatial_shape, on_grid.affine,
                                      interpolation="nearest").array)
    if not clean and sim.mirror_prob > 0 and rng.uniform() < sim.mirror_prob:
        axis = int(np.argmax(np.abs(on_grid.affine[sim.mirror_axis, :3])))
        img = np.flip(img, axis + 1)
        lab = np.flip(lab, axis + 1)
    return (np.ascontiguousarray(img), np.ascontiguousarray(lab),
            np.asarray(on_grid.affine, dtype=np.float64))


def _acquire(image: Volume, sim: AcquisitionSim, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotated, shifted acquisition with a random voxel size and slice-profile blur:
    (array ``(C, ...)`` float32, affine, voxel size mm)."""
    from scipy.ndimage import gaussian_filter

    from medinfer.transforms import resample_to_grid

    src_aff = np.asarray(image.affine, dtype=np.float64)
    world = _corners(image.spatial_shape, src_aff)
    fine_sp = float(np.linalg.norm(src_aff[:3, :3], axis=0).min())
    rot = _rotation(rng.uniform(-sim.rotate_deg, sim.rotate_deg, size=3))
    centre = world.mean(0) + rng.uniform(-sim.shift_mm, sim.shift_mm, size=3)
    acq_sp = _acq_spacing(sim, rng)
    local = (world - centre) @ rot
    lo, hi = local.min(0), local.max(0)
    fine_aff = np.eye(4)
    fine_aff[:3, :3] = rot * fine_sp
    fine_aff[:3, 3] = centre + rot @ lo
    fine_shape = tuple(int(n) for n in np.floor((hi - lo) / fine_sp) + 1)
    src = Volume(np.asarray(image.array, dtype=np.float32), src_aff, {})
    fine = np.asarray(resample_to_grid(src, fine_shape, fine_aff, interpolation="linear").array)
    sigma = np.sqrt(np.maximum(acq_sp**2 - fine_sp**2, 0.0)) / _FWHM / fine_sp
    if np.any(sigma > 0.05):
        fine = np.stack([gaussian_filter(ch, sigma=sigma, truncate=3.0) for ch in fine])
    acq_aff = fine_aff.copy()
    acq_aff[:3, :3] = rot * acq_sp[None, :]
    acq_shape = tuple(int(n) for n in
                      np.floor((np.asarray(fine_shape) - 1) * fine_sp / acq_sp) + 1)
    acq = np.asarray(resample_to_grid(Volume(fine, fine_aff, {}), acq_shape, acq_aff,
                                      interpolation="linear").array, dtype=np.float32)
    return acq, acq_aff, acq_sp


def build_bank(image: Volume, label: Volume, sim: AcquisitionSim, *, seed: int,
               case_index: int, orientation: str | None, spacing: Any,
               normalization: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``sim.bank`` simulated acquisitions of one case: ``[(image float16 (C, ...),
    label uint8/uint16 (1, ...)), ...]``; item ``i`` is seeded by ``(seed, case_index, i)``
    and item 0 is clean."""
    items = []
    for i in range(sim.bank):
        rng = np.random.default_rng([seed, case_index, i, 7])
        img, lab, _ = simulate(image, label, sim, rng, orientation=orientation,
                               spacing=spacing, normalization=normalization, clean=(i == 0))
        dtype = np.uint8 if lab.max(initial=0) <= 255 else np.uint16
        items.append((img.astype(np.float16), np.rint(lab).astype(dtype)))
        log.info("acquisition bank: case %d item %d/%d, model grid %s", case_index, i + 1,
                 sim.bank, img.shape[1:])
    return items
