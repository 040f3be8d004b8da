"""Bring any head CT / brain MRI onto the training grid: RPI, 1 x 1 x 4 mm, windows, mask.

Geometry (exact definition)
---------------------------
1. **Reorient to RPI** (nibabel convention, :func:`medinfer.transforms.reorient`): voxel
   axis 0 increases towards the patient's **Right** (index 0 is the leftmost column),
   axis 1 towards **Posterior** (index 0 is anterior), axis 2 towards **Inferior**
   (index 0 is the top of the head). This is a pure permutation/flip of the stored axes
   (no interpolation); an oblique acquisition keeps its obliquity, i.e. the grid follows
   the acquired slices (the voxel axis closest to each world axis is chosen).
2. **Through-plane axis** (the slice axis, ``d``) among the three RPI axes: the axis with
   the largest voxel spacing when it exceeds the second largest by at least
   ``PrepareConfig.anisotropy_ratio`` (default 1.2); otherwise (near-isotropic data) the
   S-I axis 2. ``z_dim`` overrides it. The axis names the view:

   =========  ===========  ====================  ====================  ====================
   view       RPI axis     d (depth, 4 mm)       h (rows, 1 mm)        w (columns, 1 mm)
   =========  ===========  ====================  ====================  ====================
   axial      2 (S-I)      superior -> inferior  anterior -> posterior left -> right
   coronal    1 (A-P)      anterior -> posterior superior -> inferior  left -> right
   sagittal   0 (L-R)      left -> right         superior -> inferior  anterior -> posterior
   =========  ===========  ====================  ====================  ====================

   i.e. the prepared array ``(D, H, W)`` is the RPI array transposed with
   ``(2, 1, 0)`` (axial), ``(1, 2, 0)`` (coronal) or ``(0, 2, 1)`` (sagittal). Every
   in-plane slice ``[d]`` is displayed with the top of the image superior (coronal,
   sagittal) or anterior (axial), patient left on the image left (neurological).
3. **Resample** to 1 mm in-plane and 4 mm through-plane along those axes
   (:func:`medinfer.transforms.resample_to_spacing`: trilinear, grid centred on the
   field of view). Axes that are down-sampled by a factor ``f > 1`` are first smoothed
   with a Gaussian of ``sigma = (f - 1) / 2`` source voxels (anti-aliasing, as
   ``skimage.transform.resize(anti_aliasing=True)``), so 4-mm slabs average thin slices
   instead of picking one.
4. **Intensities.** CT (HU): three windows, each clipped and scaled to [0, 1]
   (:func:`medinfer.transforms.normalize_intensity`, ``ct_window``): brain W 80 / L 40
   (0..80 HU), blood W 200 / L 80 (-20..180 HU), bone W 2800 / L 600 (-800..2000 HU).
   MRI: clip to the 0.5th..99.5th percentiles of all voxels of the resampled volume
   (linear interpolation between order statistics, ``numpy.percentile``), min-max to
   [0, 1].
5. **Foreground**: CT voxels above ``ct_foreground_hu`` (-500 HU: tissue, not air); MRI
   voxels above ``mri_foreground`` (0.05) after normalisation.
6. **Crop / pad**: crop to the bounding box of the foreground (so token coordinates are
   anchored on the anatomy, not on the field of view; switch off with
   ``crop_to_foreground=False``), then pad with 0 (air in every window), centred, to
   D multiple of 4 and H, W multiples of 16 (:func:`medinfer.transforms.pad_to_multiple`).
7. **Per-token background mask** on the token grid ``(D/4, H/16, W/16)``: 1 (background)
   where fewer than ``token_foreground_fraction`` (5 %) of the token's 1024 voxels are
   foreground, else 0.

The affine of the prepared grid (index ``(d, h, w)`` -> RAS+ mm) is kept in
:class:`PreparedVolume` so every token has an exact world position.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

import numpy as np

from medinfer.data.metadata import Mode
from medinfer.data.tokens import PATCH_SIZE
from medinfer.errors import ConfigError, InvalidImageError, parse_enum
from medinfer.volume import Volume

log = logging.getLogger(__name__)

#: orientation of the training grid (nibabel convention)
ORIENTATION = "RPI"

#: CT windows (width, level) in HU, in channel order
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (80.0, 40.0),
    "blood": (200.0, 80.0),
    "bone": (2800.0, 600.0),
}
#: channel name of MRI images
MRI_CHANNEL = "mri"
#: version of the preparation algorithm; part of :meth:`PrepareConfig.digest`, so a change
#: of the algorithm (bump it) invalidates existing caches like a change of parameters
PIPELINE_VERSION = 1


class View(StrEnum):
    """Acquisition plane, named by the through-plane (depth) axis."""

    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"


#: RPI axis of the through-plane direction -> view
_AXIS_VIEW = {0: View.SAGITTAL, 1: View.CORONAL, 2: View.AXIAL}
#: view -> transpose of the RPI array to (d, h, w)
VIEW_TRANSPOSE: dict[View, tuple[int, int, int]] = {
    View.AXIAL: (2, 1, 0),
    View.CORONAL: (1, 2, 0),
    View.SAGITTAL: (0, 2, 1),
}


@dataclass(frozen=True)
class PrepareConfig:
    """Parameters of :func:`prepare_volume` (defaults = the documented pipeline).

    Attributes
    ----------
    in_plane_mm, through_plane_mm : target spacing in mm.
    min_slices : fewest source slices along the through-plane axis; fewer -> unusable.
    anisotropy_ratio : through-plane detection threshold (largest / second spacing).
    ct_windows : name -> (width, level) in HU, in channel order.
    mri_percentiles : (lower, upper) percentiles for MRI clipping.
    ct_foreground_hu : CT foreground threshold in HU.
    mri_foreground : MRI foreground threshold on the [0, 1] normalised image.
    token_foreground_fraction : a token is background below this foreground fraction.
    crop_to_foreground : crop to the foreground bounding box before padding.
    antialias : Gaussian pre-filter along down-sampled axes.
    max_voxels : largest allowed prepared grid (voxels); larger -> unusable.
    """

    in_plane_mm: float = 1.0
    through_plane_mm: float = 4.0
    min_slices: int = 8
    anisotropy_ratio: float = 1.2
    ct_windows: Mapping[str, tuple[float, float]] = field(default_factory=lambda: dict(CT_WINDOWS))
    mri_percentiles: tuple[float, float] = (0.5, 99.5)
    ct_foreground_hu: float = -500.0
    mri_foreground: float = 0.05
    token_foreground_fraction: float = 0.05
    crop_to_foreground: bool = True
    antialias: bool = True
    max_voxels: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        if not (self.in_plane_mm > 0 and self.through_plane_mm > 0):
            raise ConfigError("PrepareConfig: spacings must be positive (mm)")
        if self.min_slices < 1:
            raise ConfigError(f"PrepareConfig.min_slices: expected >= 1, got {self.min_slices}")
        if self.anisotropy_ratio < 1:
            raise ConfigError(
                f"PrepareConfig.anisotropy_ratio: expected >= 1, got {self.anisotropy_ratio}"
            )
        for name, (width, _level) in self.ct_windows.items():
            if not width > 0:
                raise ConfigError(f"PrepareConfig.ct_windows[{name!r}]: width must be > 0")
        lo, hi = self.mri_percentiles
        if not 0 <= lo < hi <= 100:
            raise ConfigError(
                f"PrepareConfig.mri_percentiles: expected 0 <= lower < upper <= 100, got {lo, hi}"
            )
        if not 0 <= self.token_foreground_fraction <= 1:
            raise ConfigError("PrepareConfig.token_foreground_fraction: expected a value in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["ct_windows"] = {k: list(v) for k, v in self.ct_windows.items()}
        d["mri_percentiles"] = list(self.mri_percentiles)
        return d

    def digest(self) -> str:
        """Short hash of the parameters and :data:`PIPELINE_VERSION`."""
        text = json.dumps({"v": PIPELINE_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def channel_names(self, mode: Mode | str) -> tuple[str, ...]:
        """Channel names of ``mode``: the CT window names, or ``("mri",)``."""
        m = parse_enum(Mode, mode, "mode")
        return tuple(self.ct_windows) if m is Mode.CT else (MRI_CHANNEL,)


@dataclass(frozen=True)
class PreparedVolume:
    """A scan on the training grid.

    Attributes
    ----------
    channels : name -> float32 ``(D, H, W)`` in [0, 1] (CT: ``brain``, ``blood``,
        ``bone``; MRI: ``mri``); D % 4 == 0, H % 16 == 0, W % 16 == 0.
    background : uint8 ``(D/4, H/16, W/16)``, 1 = background token, 0 = foreground.
    view : :class:`View` value (``"axial"``, ``"coronal"``, ``"sagittal"``).
    mode : ``"ct"`` or ``"mri"``.
    affine : (4, 4) float64, index ``(d, h, w)`` -> RAS+ mm.
    source_shape : ``(I, J, K)`` of the source scan.
    source_spacing : source voxel size (mm) along I, J, K.
    """

    channels: dict[str, np.ndarray]
    background: np.ndarray
    view: str
    mode: str
    affine: np.ndarray
    source_shape: tuple[int, int, int]
    source_spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel shape ``(D, H, W)``."""
        s = next(iter(self.channels.values())).shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """Token grid size ``(D/4, H/16, W/16)``."""
        return (
            int(self.background.shape[0]),
            int(self.background.shape[1]),
            int(self.background.shape[2]),
        )


class ImageArrays(list[Any]):
    """The prepared arrays of one image: a list of float32 tensors ``[1, D, H, W]``.

    A plain ``list`` (``img_arrs[0]``, ``len``, iteration) with the channel names and the
    grid attached.

    Attributes
    ----------
    names : channel name of each entry, in order: CT ``("brain", "blood", "bone")``,
        MRI ``("mri",)``.
    token_grid : ``(D/4, H/16, W/16)``; the flat ``mask`` reshapes to it (C order).
    affine : (4, 4) float64, index ``(d, h, w)`` -> RAS+ mm.
    """

    names: tuple[str, ...] = ()
    token_grid: tuple[int, int, int] = (0, 0, 0)
    affine: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        """``{name: tensor [1, D, H, W]}``."""
        return dict(zip(self.names, self, strict=True))


class PreparedImage(NamedTuple):
    """``(img_arrs, mask, view)`` as returned by :func:`prepare_for_inference`.

    Attributes
    ----------
    img_arrs : :class:`ImageArrays`, a list of float32 ``torch.Tensor`` ``[1, D, H, W]`` in
        [0, 1], one per channel (CT: brain, blood, bone windows in that order; MRI: one).
    mask : uint8 ``torch.Tensor`` ``[N]``, N = (D/4)(H/16)(W/16) tokens in C order over
        the token grid (as :func:`medinfer.data.tokenize`), 1 = background, 0 = foreground.
    view : ``"axial"``, ``"coronal"`` or ``"sagittal"``.
    """

    img_arrs: ImageArrays
    mask: Any
    view: str


def window_names(mode: Mode | str, config: PrepareConfig | None = None) -> tuple[str, ...]:
    """Channel names in ``img_arrs`` order: CT ``("brain", "blood", "bone")``, MRI ``("mri",)``.

    Raises
    ------
    ConfigError
        ``mode`` is not ``"ct"`` / ``"mri"``.
    """
    return (config or PrepareConfig()).channel_names(mode)


def as_volume(image: Any, what: str = "image") -> Volume:
    """A :class:`Volume` from a Volume, a path, a ``SimpleITK.Image`` or a nibabel image.

    SimpleITK images carry an LPS geometry (origin, spacing, direction); it is converted
    to the RAS+ affine with :func:`medinfer.io._lps.affine_lps_to_ras`. nibabel images
    give their affine (RAS+) and their data with ``scl_slope`` / ``scl_inter`` applied
    (float32 where scaled). Multi-component / 4-D images become channels ``(C, I, J, K)``.
    Paths are read with :func:`load_image` (``preprocess=False``).

    Raises
    ------
    InvalidImageError
        Any other type, or an image that is not 3-D (or 4-D for nibabel).
    """
    if isinstance(image, Volume):
        return image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, preprocess=False)
    mod = type(image).__module__ or ""
    if mod.startswith("SimpleITK"):
        import SimpleITK as sitk

        from medinfer.io._lps import affine_lps_to_ras

        dim = int(image.GetDimension())
        if dim != 3:
            raise InvalidImageError(f"{what}: SimpleITK image of dimension {dim}; expected 3")
        arr = sitk.GetArrayFromImage(image)  # (z, y, x) or (z, y, x, components)
        if image.GetNumberOfComponentsPerPixel() > 1:
            arr = arr.transpose(3, 2, 1, 0)
        else:
            arr = arr.transpose(2, 1, 0)[None]
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        lps = np.eye(4)
        lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
        lps[:3, 3] = image.GetOrigin()
        return Volume(np.ascontiguousarray(arr), affine_lps_to_ras(lps), {"source": "SimpleITK"})
    if mod.startswith("nibabel") and hasattr(image, "dataobj") and hasattr(image, "affine"):
        proxy = image.dataobj
        slope = getattr(proxy, "slope", 1.0)
        inter = getattr(proxy, "inter", 0.0)
        scaled = not (slope in (1.0, None) and inter in (0.0, None))
        arr = np.asarray(image.get_fdata(dtype=np.float32) if scaled else np.asanyarray(proxy))
        if arr.ndim == 3:
            arr = arr[None]
        elif arr.ndim == 4:
            arr = np.moveaxis(arr, 3, 0)
        else:
            raise InvalidImageError(f"{what}: nibabel image of shape {arr.shape}; expected 3-D")
        return Volume(np.ascontiguousarray(arr), image.affine, {"source": "nibabel"})
    raise InvalidImageError(
        f"{what}: {mod}.{type(image).__name__} is not an image; pass a path, a medinfer "
        "Volume, a SimpleITK.Image or a nibabel image"
    )


def load_image(
    path: str | os.PathLike[str],
    preprocess: bool = True,
    *,
    series_uid: str | None = None,
) -> Volume:
    """Load a NIfTI file, a single DICOM file or a DICOM folder (auto-detected).

    Parameters
    ----------
    path : file or folder.
    preprocess : True (default): reoriented to RPI (:data:`ORIENTATION`; a pure
        permutation/flip, no interpolation; resampling and intensities are
        :func:`prepare_for_inference`'s job). False: the voxel array as stored.
    series_uid : choose one series in a DICOM folder that holds several.

    Returns
    -------
    Volume ``(C, I, J, K)`` with affine voxel -> RAS+ mm (CT in HU where the file has
    rescale slope/intercept).

    Raises
    ------
    InvalidImageError
        Not a path, or a missing, unreadable or unsupported input (from
        :func:`medinfer.io.load`).
    SeriesSelectionError
        A DICOM folder with several series and no ``series_uid``.
    """
    from medinfer import io, transforms

    if not isinstance(path, (str, os.PathLike)):
        raise InvalidImageError(
            f"load_image: {type(path).__name__} is not a path; pass a file or folder path "
            "(in-memory images go to prepare_for_inference directly)"
        )
    if not os.path.exists(path):
        raise InvalidImageError(f"{path}: no such file or folder")
    if series_uid is not None:
        vol = io.load(path, series_uid=series_uid)  # type: ignore[call-arg,unused-ignore]
    else:
        vol = io.load(path)
    return transforms.reorient(vol, ORIENTATION) if preprocess else vol


def _through_plane_axis(spacing: np.ndarray, ratio: float) -> int:
    order = np.argsort(spacing, kind="stable")
    largest, second = spacing[order[2]], spacing[order[1]]
    if largest >= ratio * second:
        return int(order[2])
    return 2


def _parse_z_dim(z_dim: int | str | View | None) -> int | None:
    if z_dim is None:
        return None
    if isinstance(z_dim, (int, np.integer)) and not isinstance(z_dim, bool):
        if int(z_dim) not in (0, 1, 2):
            raise ConfigError(f"z_dim: {z_dim!r} is not an RPI axis; use 0, 1 or 2 (or a view)")
        return int(z_dim)
    if isinstance(z_dim, (str, View)):
        view = parse_enum(View, z_dim, "z_dim")
        return {v: a for a, v in _AXIS_VIEW.items()}[view]
    raise ConfigError(f"z_dim: {z_dim!r}; use None, 0, 1, 2 or 'axial'/'coronal'/'sagittal'")


def prepare_volume(
    volume: Volume,
    mode: Mode | str = Mode.CT,
    z_dim: int | str | View | None = None,
    *,
    config: PrepareConfig | None = None,
) -> PreparedVolume | None:
    """Bring ``volume`` onto the training grid (see the module docstring for every step).

    Parameters
    ----------
    volume : Volume ``(1, I, J, K)`` (CT in HU; MRI in any units), any frame.
    mode : ``"ct"`` or ``"mri"``.
    z_dim : override the through-plane axis: an RPI axis (0 = L-R / sagittal,
        1 = A-P / coronal, 2 = S-I / axial) or a view name; None detects it from spacing.
    config : :class:`PrepareConfig` (defaults if None).

    Returns
    -------
    PreparedVolume, or None (with a logged warning giving the reason) if the image
    cannot be used: more than one channel, non-finite values, fewer than
    ``config.min_slices`` slices, a prepared grid above ``config.max_voxels``, a
    constant MRI, or no foreground.

    Raises
    ------
    ConfigError
        Bad ``mode`` or ``z_dim``.
    """
    result = prepare_volume_or_reason(volume, mode, z_dim, config=config)
    if isinstance(result, str):
        log.warning(
            "prepare_for_inference: %s unusable: %s", volume.meta.get("source", "image"), result
        )
        return None
    return result


def prepare_volume_or_reason(
    volume: Volume,
    mode: Mode | str = Mode.CT,
    z_dim: int | str | View | None = None,
    *,
    config: PrepareConfig | None = None,
) -> PreparedVolume | str:
    """As :func:`prepare_volume`, but return the reason (a string) instead of None."""
    from scipy.ndimage import gaussian_filter1d

    from medinfer import transforms

    cfg = config or PrepareConfig()
    m = parse_enum(Mode, mode, "mode")
    forced_axis = _parse_z_dim(z_dim)
    if volume.num_channels != 1:
        return f"{volume.num_channels} channels (time points); expected 1"
    if not np.issubdtype(volume.array.dtype, np.number) or np.issubdtype(
        volume.array.dtype, np.complexfloating
    ):
        return f"dtype {volume.array.dtype} is not a real number type"
    if volume.array.dtype.kind == "f" and not np.all(np.isfinite(volume.array)):
        return "contains NaN or infinite values"

    rpi = transforms.reorient(volume, ORIENTATION)
    spacing = np.asarray(rpi.spacing, dtype=np.float64)
    axis = (
        forced_axis
        if forced_axis is not None
        else _through_plane_axis(spacing, cfg.anisotropy_ratio)
    )
    view = _AXIS_VIEW[axis]
    n_slices = rpi.spatial_shape[axis]
    if n_slices < cfg.min_slices:
        return (
            f"{n_slices} slices along the {view.value} through-plane axis; "
            f"need at least {cfg.min_slices}"
        )
    target = [cfg.in_plane_mm] * 3
    target[axis] = cfg.through_plane_mm
    new_shape, _ = transforms.resampled_grid(rpi.spatial_shape, rpi.affine, target)
    if int(np.prod(new_shape)) > cfg.max_voxels:
        return f"prepared grid {new_shape} has more than {cfg.max_voxels} voxels"

    data = rpi.array[0].astype(np.float32, copy=True)
    # In-plane axes first, then the through-plane axis on the smaller in-plane grid. The
    # Gaussian pre-filter and the linear resampling are separable per axis, so this equals
    # filtering all axes and resampling once, at a fraction of the memory traffic.
    current = Volume(data, rpi.affine, rpi.meta)
    in_plane = [ax for ax in range(3) if ax != axis]
    for axes in (in_plane, [axis]):
        step_spacing = [float(v) for v in current.spacing]
        for ax in axes:
            factor = target[ax] / step_spacing[ax]
            if cfg.antialias and factor > 1.0 + 1e-6:
                gaussian_filter1d(
                    current.array[0],
                    sigma=(factor - 1.0) / 2.0,
                    axis=ax,
                    mode="nearest",
                    output=current.array[0],
                )
            step_spacing[ax] = target[ax]
        current = transforms.resample_to_spacing(current, step_spacing, interpolation="linear")
    resampled = current

    # RPI (i, j, k) -> (d, h, w): column permutation of the affine
    perm = VIEW_TRANSPOSE[view]
    arr = np.ascontiguousarray(resampled.array[0].transpose(perm))
    p = np.zeros((4, 4))
    for n, src_axis in enumerate(perm):
        p[src_axis, n] = 1.0
    p[3, 3] = 1.0
    affine = resampled.affine @ p

    names = cfg.channel_names(m)
    hu_or_raw = Volume(arr, affine, resampled.meta)
    channels: list[np.ndarray] = []
    if m is Mode.CT:
        for name in names:
            width, level = cfg.ct_windows[name]
            spec = {"method": "ct_window", "min_hu": level - width / 2, "max_hu": level + width / 2}
            win = transforms.normalize_intensity(hu_or_raw, spec).array[0]
            channels.append(np.clip(win, 0.0, 1.0, out=win))
        foreground = arr > cfg.ct_foreground_hu
    else:
        spec = {
            "method": "percentile",
            "lower": cfg.mri_percentiles[0],
            "upper": cfg.mri_percentiles[1],
            "nonzero": False,
        }
        try:
            norm = transforms.normalize_intensity(hu_or_raw, spec).array[0]
        except InvalidImageError:  # no range between the percentiles
            norm = np.zeros_like(arr)
        np.clip(norm, 0.0, 1.0, out=norm)  # float rounding of min-max can give 1.0000001
        if not norm.max() > 0:  # upper percentile == lower percentile: all set to 0
            return f"MRI intensities are constant between the {cfg.mri_percentiles} percentiles"
        channels.append(norm)
        foreground = norm > cfg.mri_foreground
    if not foreground.any():
        return "no foreground voxels (all air / background)"

    if cfg.crop_to_foreground:
        start, stop = [], []
        for a in range(3):
            other = tuple(b for b in range(3) if b != a)
            nz = np.flatnonzero(foreground.any(axis=other))
            start.append(int(nz[0]))
            stop.append(int(nz[-1]) + 1)
        sl = tuple(slice(s, e) for s, e in zip(start, stop, strict=True))
        t = np.eye(4)
        t[:3, 3] = start
        affine = affine @ t
        channels = [c[sl] for c in channels]
        foreground = foreground[sl]

    stack = np.stack([*channels, foreground.astype(np.float32)])
    padded, _rec = transforms.pad_to_multiple(Volume(stack, affine), list(PATCH_SIZE), value=0.0)
    out = padded.array
    fg = out[-1] > 0.5
    d, h, w = (s // p for s, p in zip(fg.shape, PATCH_SIZE, strict=True))
    frac = fg.reshape(d, PATCH_SIZE[0], h, PATCH_SIZE[1], w, PATCH_SIZE[2]).mean(axis=(1, 3, 5))
    background = (frac < cfg.token_foreground_fraction).astype(np.uint8)
    return PreparedVolume(
        channels={
            n: np.clip(np.ascontiguousarray(out[i], dtype=np.float32), 0.0, 1.0)
            for i, n in enumerate(names)
        },
        background=background,
        view=view.value,
        mode=m.value,
        affine=np.asarray(padded.affine, dtype=np.float64),
        source_shape=volume.spatial_shape,
        source_spacing=(
            float(volume.spacing[0]),
            float(volume.spacing[1]),
            float(volume.spacing[2]),
        ),
    )


def prepare_for_inference(
    image: Any,
    mode: Mode | str = Mode.CT,
    z_dim: int | str | View | None = None,
    *,
    config: PrepareConfig | None = None,
) -> PreparedImage | None:
    """Prepare one scan for the foundation model: ``(img_arrs, mask, view)`` or None.

    Parameters
    ----------
    image : a path (NIfTI file, DICOM file or DICOM folder; :func:`load_image`), a
        :class:`~medinfer.volume.Volume`, a ``SimpleITK.Image`` (LPS geometry) or a
        nibabel image (see :func:`as_volume`); any orientation, spacing, obliquity.
    mode : ``"ct"`` (three windows, input in HU) or ``"mri"`` (percentile normalisation).
    z_dim : through-plane axis override (RPI axis 0/1/2 or a view name); None = detect.
    config : :class:`PrepareConfig`.

    Returns
    -------
    PreparedImage ``(img_arrs, mask, view)``:
        ``img_arrs`` :class:`ImageArrays`, a list of float32 ``torch.Tensor``
        ``[1, D, H, W]`` with values in [0, 1] (clipped after every float operation),
        axes (d, h, w) as in the module table; CT: the brain, blood and bone windows in
        that order, MRI: one entry; ``img_arrs.names`` gives the names
        (:func:`window_names`);
        ``mask`` uint8 ``torch.Tensor`` ``[N]``, one value per 4 x 16 x 16 token in C order
        over ``img_arrs.token_grid`` (the order of :func:`medinfer.data.tokenize`),
        1 = background token, 0 = foreground;
        ``view`` ``"axial"`` / ``"coronal"`` / ``"sagittal"``.
    None when the image cannot be used (reason logged as a warning, see
    :func:`prepare_volume`).

    Raises
    ------
    InvalidImageError
        A path that cannot be read, or an object that is not an image.
    ConfigError
        Bad ``mode`` or ``z_dim``.
    """
    import torch

    vol = as_volume(image, "prepare_for_inference: image")
    prepared = prepare_volume(vol, mode, z_dim, config=config)
    if prepared is None:
        return None
    arrs = ImageArrays(torch.from_numpy(a[None]) for a in prepared.channels.values())
    arrs.names = tuple(prepared.channels)
    arrs.token_grid = prepared.token_grid
    arrs.affine = prepared.affine
    mask = torch.from_numpy(np.ascontiguousarray(prepared.background, dtype=np.uint8).reshape(-1))
    return PreparedImage(arrs, mask, prepared.view)
