"""Tokenisation of a prepared volume into 4 x 16 x 16 patches, and its exact inverse.

A prepared volume (see :func:`medinfer.data.prepare_for_inference`) is a float array of
shape ``(D, H, W)`` on the model grid (depth = through-plane axis at 4 mm, H and W
in-plane at 1 mm), with ``D % 4 == 0``, ``H % 16 == 0`` and ``W % 16 == 0``. It is cut
into non-overlapping patches of ``(4, 16, 16)`` voxels; each patch, flattened in C order
(depth slowest, then height, then width), is one token of length 1024.

Token order is C order over the token grid ``(d, h, w)``: token ``n`` has coordinates
``coords[n] = (d, h, w)`` with ``n = (d * size[1] + h) * size[2] + w``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from medinfer.errors import ConfigError

#: patch size in voxels along (d, h, w)
PATCH_SIZE: tuple[int, int, int] = (4, 16, 16)
#: number of values per token
TOKEN_LENGTH: int = PATCH_SIZE[0] * PATCH_SIZE[1] * PATCH_SIZE[2]


@dataclass(frozen=True)
class Tokens:
    """Tokens of one volume.

    Attributes
    ----------
    tokens : (N, 1024) array, the dtype of the input volume; patch voxels in C order
        over ``(4, 16, 16)``.
    coords : (N, 3) int64, token grid coordinates ``(d, h, w)``.
    background : (N,) bool, True where the token is background (filtered).
    size : (3,) int64, token grid size ``(D / 4, H / 16, W / 16)``.
    """

    tokens: np.ndarray
    coords: np.ndarray
    background: np.ndarray
    size: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def token_grid_size(
    shape: tuple[int, ...], patch: tuple[int, int, int] = PATCH_SIZE
) -> tuple[int, int, int]:
    """Token grid size ``(d, h, w)`` of a volume of voxel ``shape`` ``(D, H, W)``.

    Raises
    ------
    ConfigError
        If ``shape`` is not 3-D or not divisible by ``patch`` along every axis.
    """
    if len(shape) != 3:
        raise ConfigError(f"volume shape: expected (D, H, W), got {tuple(shape)}")
    if any(s % p for s, p in zip(shape, patch, strict=True)) or any(s <= 0 for s in shape):
        raise ConfigError(
            f"volume shape {tuple(shape)}: every axis must be a positive multiple of the "
            f"patch size {patch} (pad with prepare_for_inference first)"
        )
    return (shape[0] // patch[0], shape[1] // patch[1], shape[2] // patch[2])


def tokenize(
    volume: npt.ArrayLike,
    background: npt.ArrayLike | None = None,
    *,
    drop_background: bool = False,
) -> Tokens:
    """Cut a ``(D, H, W)`` volume into ``(4, 16, 16)`` patch tokens.

    Parameters
    ----------
    volume : (D, H, W) array on the model grid (any dtype; kept). D multiple of 4,
        H and W multiples of 16.
    background : (D/4, H/16, W/16) per-token background mask (1 = background,
        0 = foreground), as returned by :func:`medinfer.data.prepare_for_inference`;
        ``None`` means every token is foreground.
    drop_background : if True, only foreground tokens are returned (their ``coords``
        say where they belong); :func:`detokenize` fills the others.

    Returns
    -------
    Tokens
        ``tokens (N, 1024)``, ``coords (N, 3)`` int64 ``(d, h, w)``, ``background (N,)``
        bool, ``size (3,)`` int64.

    Raises
    ------
    ConfigError
        Wrong dimensionality, a shape not divisible by the patch size, or a background
        mask whose shape is not the token grid.
    """
    arr = np.asarray(volume)
    size = token_grid_size(tuple(arr.shape))
    d, h, w = size
    pd, ph, pw = PATCH_SIZE
    tok = (
        arr.reshape(d, pd, h, ph, w, pw)
        .transpose(0, 2, 4, 1, 3, 5)
        .reshape(d * h * w, TOKEN_LENGTH)
    )
    coords = np.indices(size, dtype=np.int64).reshape(3, -1).T
    if background is None:
        bg = np.zeros(d * h * w, dtype=bool)
    else:
        bgrid = np.asarray(background)
        if bgrid.shape != size:
            raise ConfigError(
                f"background mask shape {bgrid.shape} does not match the token grid {size}"
            )
        bg = bgrid.reshape(-1).astype(bool)
    if drop_background:
        keep = ~bg
        tok, coords, bg = tok[keep], coords[keep], bg[keep]
    return Tokens(
        tokens=np.ascontiguousarray(tok),
        coords=coords,
        background=bg,
        size=np.asarray(size, dtype=np.int64),
    )


def detokenize(
    tokens: npt.ArrayLike,
    coords: npt.ArrayLike,
    size: npt.ArrayLike,
    *,
    fill_value: float = 0.0,
) -> np.ndarray:
    """Exact inverse of :func:`tokenize`: put tokens back into a ``(D, H, W)`` volume.

    Parameters
    ----------
    tokens : (N, 1024) token values.
    coords : (N, 3) integer token coordinates ``(d, h, w)``.
    size : (3,) token grid size ``(d, h, w)``.
    fill_value : value of voxels whose token is absent (dropped background tokens).

    Returns
    -------
    numpy array ``(4 d, 16 h, 16 w)`` with the tokens' dtype; bit-identical to the
    tokenised volume wherever a token is present.

    Raises
    ------
    ConfigError
        Inconsistent shapes, coordinates outside the grid, or repeated coordinates.
    """
    tok = np.asarray(tokens)
    c = np.asarray(coords)
    s = tuple(int(v) for v in np.asarray(size).reshape(-1))
    if len(s) != 3 or any(v <= 0 for v in s):
        raise ConfigError(f"token grid size: expected 3 positive integers, got {s}")
    if tok.ndim != 2 or tok.shape[1] != TOKEN_LENGTH:
        raise ConfigError(f"tokens: expected shape (N, {TOKEN_LENGTH}), got {tok.shape}")
    if c.shape != (tok.shape[0], 3) or not np.issubdtype(c.dtype, np.integer):
        raise ConfigError(f"coords: expected integer shape ({tok.shape[0]}, 3), got {c.shape}")
    if c.size and (np.any(c < 0) or np.any(c >= np.asarray(s))):
        raise ConfigError(f"coords: values outside the token grid {s}")
    flat = np.ravel_multi_index(tuple(c.T), s) if c.size else np.zeros(0, dtype=np.int64)
    if np.unique(flat).size != flat.size:
        raise ConfigError("coords: a token coordinate occurs more than once")
    d, h, w = s
    pd, ph, pw = PATCH_SIZE
    grid = np.full((d * h * w, TOKEN_LENGTH), fill_value, dtype=tok.dtype)
    grid[flat] = tok
    return np.ascontiguousarray(
        grid.reshape(d, h, w, pd, ph, pw)
        .transpose(0, 3, 1, 4, 2, 5)
        .reshape(d * pd, h * ph, w * pw)
    )
