"""Siemens MOSAIC images: one DICOM image holding a whole 3-D volume as a grid of tiles.

A MOSAIC image (``ImageType`` contains ``MOSAIC``; EPI / fMRI / diffusion series) packs
``NumberOfImagesInMosaic`` slices of ``tile_rows x tile_cols`` pixels into a square grid
of ``ceil(sqrt(n))`` tiles per side, row by row from the top left; unused tiles are
blank. The number of images and the slice normal come from the Siemens CSA image header
(private group 0x0029, parsed by :mod:`nibabel.nicom.csareader`), with the Siemens
private element ``NumberOfImagesInMosaic`` (0019,100A) as fallback for the count.

Geometry (LPS, the DICOM patient frame): ImagePositionPatient of a MOSAIC image is the
position of the top-left pixel of the *whole mosaic* as if it were one image; the first
tile's first pixel lies ``((Rows - tile_rows) / 2, (Columns - tile_cols) / 2)`` pixels
further along the column and row directions (nibabel's ``MosaicWrapper.image_position``,
dcm2niix's ``nii_mosaicCorrect``). Tile ``k`` lies ``k * spacing`` mm along the CSA
``SliceNormalVector`` (the cross product of the row and column cosines when absent),
``spacing`` = SpacingBetweenSlices, else SliceThickness. This reproduces dcm2niix's
geometry (tested to 0.01 mm).

A mosaic whose Rows / Columns are not a whole number of tiles cannot be split and is
refused (:class:`~medinfer.errors.InvalidImageError`) rather than read as wrong slices.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from medinfer.errors import GeometryError, InvalidImageError

__all__ = ["MosaicLayout", "detile", "first_tile_position", "is_mosaic", "mosaic_layout"]

_N_MOSAIC_TAG = (0x0019, 0x100A)


@dataclass(frozen=True)
class MosaicLayout:
    """How a MOSAIC image splits into slices.

    ``n_images`` slices of ``tile_rows x tile_cols`` pixels on a ``grid x grid`` tile
    grid; ``normal`` is the CSA SliceNormalVector (LPS, unit length) or ``None``.
    """

    n_images: int
    grid: int
    tile_rows: int
    tile_cols: int
    normal: np.ndarray | None


def is_mosaic(ds: Any) -> bool:
    """Whether the data set is a Siemens MOSAIC image (``MOSAIC`` in ``ImageType``)."""
    try:
        image_type = ds.get("ImageType")
    except (KeyError, ValueError, TypeError, AttributeError):
        return False
    if image_type is None:
        return False
    values = [image_type] if isinstance(image_type, str | bytes) else list(image_type)
    return any(str(v).strip().upper() == "MOSAIC" for v in values)


def _csa_image_header(ds: Any) -> dict[str, Any] | None:
    with warnings.catch_warnings():
        # importing nibabel.nicom warns that its DICOM *readers* are experimental; only
        # the CSA header parser is used here
        warnings.simplefilter("ignore")
        from nibabel.nicom import csareader

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return csareader.get_csa_header(ds, "image")
    except (csareader.CSAReadError, KeyError, ValueError, TypeError, IndexError):
        return None


def _csa_value(csa: dict[str, Any] | None, name: str) -> list[Any]:
    if not csa:
        return []
    tag = (csa.get("tags") or {}).get(name) or {}
    return list(tag.get("items") or [])


def mosaic_layout(ds: Any, where: str, rows: int, cols: int) -> MosaicLayout:
    """The tile layout of a MOSAIC image of ``rows x cols`` pixels.

    Raises
    ------
    InvalidImageError
        No number of images (neither CSA ``NumberOfImagesInMosaic`` nor (0019,100A)),
        or a mosaic size that is not a whole number of tiles.
    """
    csa = _csa_image_header(ds)
    n: int | None = None
    items = _csa_value(csa, "NumberOfImagesInMosaic")
    if items:
        try:
            n = int(items[0])
        except (TypeError, ValueError):
            n = None
    if not n and _N_MOSAIC_TAG in ds:
        try:
            n = int(ds[_N_MOSAIC_TAG].value)
        except (TypeError, ValueError):
            n = None
    if not n or n < 1:
        raise InvalidImageError(
            f"{where}: a Siemens MOSAIC image without NumberOfImagesInMosaic (CSA image "
            "header or (0019,100A)); its slices cannot be separated. Convert the series "
            "with dcm2niix first"
        )
    grid = math.ceil(math.sqrt(n))
    if rows % grid or cols % grid:
        raise InvalidImageError(
            f"{where}: a Siemens MOSAIC image of {rows} x {cols} pixels cannot hold "
            f"{n} slices on a {grid} x {grid} tile grid ({rows} / {grid} and {cols} / "
            f"{grid} are not whole numbers); refusing to split it into wrong slices. "
            "Convert the original series with dcm2niix"
        )
    normal = None
    vec = _csa_value(csa, "SliceNormalVector")
    if len(vec) == 3:
        try:
            v = np.array([float(x) for x in vec], dtype=np.float64)
        except (TypeError, ValueError):
            v = np.zeros(3)
        if np.all(np.isfinite(v)) and np.linalg.norm(v) > 1e-6:
            normal = v / np.linalg.norm(v)
    return MosaicLayout(n, grid, rows // grid, cols // grid, normal)


def detile(pixels: np.ndarray, layout: MosaicLayout) -> np.ndarray:
    """Mosaic pixels ``(rows, cols)`` -> slices ``(n_images, tile_rows, tile_cols)``."""
    g, tr, tc = layout.grid, layout.tile_rows, layout.tile_cols
    tiles = pixels.reshape(g, tr, g, tc).transpose(0, 2, 1, 3).reshape(g * g, tr, tc)
    return np.ascontiguousarray(tiles[: layout.n_images])


def first_tile_position(
    ipp: np.ndarray,
    row_cosine: np.ndarray,
    col_cosine: np.ndarray,
    pixel_spacing: np.ndarray,
    rows: int,
    cols: int,
    layout: MosaicLayout,
    where: str,
) -> np.ndarray:
    """LPS position (mm) of the first pixel of the first tile (module docstring).

    ``pixel_spacing`` is DICOM PixelSpacing (between rows, between columns).

    Raises
    ------
    GeometryError
        Non-positive pixel spacing.
    """
    if np.any(pixel_spacing <= 0):
        raise GeometryError(f"{where}: PixelSpacing {pixel_spacing.tolist()} is not positive")
    down = (rows - layout.tile_rows) / 2.0  # pixels along the column direction
    across = (cols - layout.tile_cols) / 2.0  # pixels along the row direction
    return (
        ipp
        + row_cosine * float(pixel_spacing[1]) * across
        + col_cosine * float(pixel_spacing[0]) * down
    )
