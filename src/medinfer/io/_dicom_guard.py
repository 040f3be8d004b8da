"""Bounded DICOM decoding: capped inflation, frame-count checks, rescaling without big temporaries.

Helpers of :mod:`medinfer.io.dicom` for hostile files:

- :func:`dcmread_bounded` reads a file like :func:`pydicom.dcmread`, but a data set in
  the Deflated Explicit VR Little Endian transfer syntax (PS3.5 A.5) is inflated in
  chunks with a byte cap (``MEDINFER_MAX_UNPACKED_BYTES``, default 2 GiB) instead of
  pydicom's unbounded ``zlib.decompress``; a corrupt deflate stream is an
  :class:`~medinfer.errors.InvalidImageError`.
- :func:`check_pixel_bytes` compares the pixel bytes a header announces (Rows x Columns
  x NumberOfFrames x BitsAllocated) with the size of the file, so an 800-byte file
  announcing 10^6 frames is refused before any per-frame object is built.
- :func:`rescale_into` writes ``stored * slope + intercept`` of one frame into the
  output array in row blocks of at most :data:`BLOCK_VOXELS` voxels, so the temporaries
  stay small whatever the frame size (no int64/float64 copy of a whole frame).
"""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _at_pixel_data, _read_file_meta_info, read_dataset, read_preamble

from medinfer.errors import InvalidImageError, ResourceLimitError
from medinfer.io._dtypes import fits, smallest_int_dtype
from medinfer.io._limits import MAX_UNPACKED_ENV, check_array_size, resolve_max_unpacked_bytes

#: Deflated Explicit VR Little Endian (PS3.5 A.5)
DEFLATED_TS = "1.2.840.10008.1.2.1.99"
#: voxels per block when rescaling a frame (bounds the float64/int64 temporaries: 8 MiB)
BLOCK_VOXELS = 1 << 20
_CHUNK = 1 << 20
# transfer syntaxes whose pixel data are stored uncompressed in the file
_NATIVE_TS = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
)


def _meta_ts(ds: Dataset) -> str:
    try:
        meta = getattr(ds, "file_meta", None)
        if meta is None:
            return ""
        return str(meta.get("TransferSyntaxUID", "") or "")
    except Exception:  # a corrupt meta element: unknown transfer syntax
        return ""



def dcmread_bounded(
    path: str | os.PathLike[str],
    *,
    stop_before_pixels: bool = False,
    force: bool = False,
    defer_size: str | int | None = None,
) -> Dataset:
    """:func:`pydicom.dcmread` with a capped inflation of deflated data sets.

    Raises
    ------
    ResourceLimitError
        A deflated data set inflates to more than ``MEDINFER_MAX_UNPACKED_BYTES``.
    InvalidImageError
        The deflate stream is corrupt or truncated.
    pydicom / OS errors
        As :func:`pydicom.dcmread` (the callers map them to ``InvalidImageError``).
    """
    p = Path(path)
    # no deferred reading: a deferred element is re-read later from the file name, outside
    # the clamped reader, and a corrupt length would then allocate up to 4 GiB
    del defer_size
    with _ClampedReader(io.FileIO(str(p), "rb")) as fp:
        head = fp.read(1 << 16)
        if DEFLATED_TS.encode() not in head:
            fp.seek(0)
            return pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, force=force)
        fp.seek(0)
        preamble = read_preamble(fp, force)
        meta = _read_file_meta_info(fp)
        if str(meta.get("TransferSyntaxUID", "")).strip("\x00 ") != DEFLATED_TS:
            fp.seek(0)
            return pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, force=force)
        data = inflate_capped(fp, resolve_max_unpacked_bytes(), str(p))
    buf = DicomBytesIO(data)
    del data
    ds = read_dataset(
        buf,  # type: ignore[arg-type]
        is_implicit_VR=False,
        is_little_endian=True,
        stop_when=_at_pixel_data if stop_before_pixels else None,
    )
    out = FileDataset(str(p), ds, preamble, meta, is_implicit_VR=False, is_little_endian=True)
    out.set_original_encoding(False, True, ds._character_set)
    return out


class _ClampedReader(io.BufferedReader):
    """A file whose ``read(n)`` never asks for more than the bytes left in the file.

    pydicom reads an element with ``read(length)``; a corrupt 32-bit length would
    otherwise allocate up to 4 GiB for a file of a few hundred bytes.
    """

    def __init__(self, raw: io.FileIO) -> None:
        super().__init__(raw)
        self._size = os.fstat(raw.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = max(1, min(size, self._size - self.tell()))
        return super().read(size)


def inflate_capped(fp: BinaryIO, cap: int, what: str) -> bytes:
    """Inflate the raw deflate stream (no zlib header, PS3.5 A.5) read from ``fp``.

    Raises
    ------
    ResourceLimitError
        More than ``cap`` bytes come out.
    InvalidImageError
        Corrupt or truncated stream.
    """
    dec = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()

    def take(data: bytes) -> None:
        out.extend(dec.decompress(data, cap + 1 - len(out)))
        if len(out) > cap:
            raise ResourceLimitError(
                f"{what}: the deflated DICOM data set inflates to more than {cap:,} bytes "
                f"(set {MAX_UNPACKED_ENV} to raise the limit)"
            )

    try:
        while not dec.eof:
            chunk = fp.read(_CHUNK)
            if not chunk:
                break
            take(chunk)
            while dec.unconsumed_tail and not dec.eof:
                take(dec.unconsumed_tail)
    except zlib.error as exc:
        raise InvalidImageError(f"{what}: corrupt deflate stream ({exc})") from None
    if not dec.eof:
        raise InvalidImageError(f"{what}: truncated deflate stream (the file ends early)")
    return bytes(out)


def check_pixel_bytes(ds: Dataset, path: Path, n_frames: int, rows: int, cols: int) -> None:
    """Refuse a header whose pixel data cannot be in a file of this size.

    Native (uncompressed) transfer syntaxes must hold ``rows * cols * frames *
    BitsAllocated / 8`` bytes; encapsulated ones at least one 8-byte item per frame
    (PS3.5 A.4). Deflated files are bounded by the inflation cap instead.

    Raises
    ------
    InvalidImageError
        The file is too small for what its header announces.
    """
    ts = _meta_ts(ds)
    if ts == DEFLATED_TS:
        return
    try:
        size = path.stat().st_size
    except OSError:
        return
    if not ts or ts in _NATIVE_TS:
        try:
            bits = int(ds.get("BitsAllocated") or 8)
        except Exception:  # any parse failure: the pixel read reports it
            bits = 8
        need = (rows * cols * n_frames * max(1, bits) + 7) // 8
        kind = "uncompressed pixel data"
    else:
        need = 8 * n_frames
        kind = "encapsulated pixel data (one 8-byte item per frame at least)"
    if need > size:
        raise InvalidImageError(
            f"{path}: the header announces {n_frames:,} frame(s) of {rows} x {cols} "
            f"({kind}: {need:,} bytes or more) but the file has only {size:,} bytes; "
            "truncated file or a wrong NumberOfFrames"
        )


def rescale_into(
    out: np.ndarray,
    k: int,
    raw: np.ndarray,
    slope: float,
    intercept: float,
    max_bytes: int | None,
    what: str,
) -> np.ndarray:
    """Write ``raw * slope + intercept`` into ``out[k]`` in row blocks; return ``out``.

    ``out`` is ``(K, rows, cols)``; ``raw`` one frame ``(rows, cols)`` of stored values.
    Integer outputs are widened (a new array is returned) when stored values exceed
    BitsStored so that nothing wraps around.

    Raises
    ------
    InvalidImageError
        Rescaled values beyond the int64 range.
    ResourceLimitError
        The widened array would exceed the byte limit.
    """
    n_rows = raw.shape[0] if raw.ndim else 1
    step = max(1, BLOCK_VOXELS // max(1, raw.shape[-1] if raw.ndim else 1))
    if out.dtype.kind == "f":
        scaled = slope != 1.0 or intercept != 0.0
        for r0 in range(0, n_rows, step):
            blk: np.ndarray[Any, Any] = raw[r0 : r0 + step].astype(np.float64)
            if scaled:
                blk *= slope
                blk += intercept
            out[k, r0 : r0 + step] = blk
        return out
    s, b = int(slope), int(intercept)
    if raw.size:
        a1, a2 = int(raw.min()) * s + b, int(raw.max()) * s + b
        lo, hi = min(a1, a2), max(a1, a2)
        if not fits(out.dtype, lo, hi):
            if not fits(np.dtype(np.int64), lo, hi):
                raise InvalidImageError(
                    f"{what}: rescaled values [{lo}, {hi}] (RescaleSlope {slope:g}, "
                    f"RescaleIntercept {intercept:g}) exceed the 64-bit integer range"
                )
            info = np.iinfo(out.dtype)
            wider = smallest_int_dtype(min(lo, int(info.min)), max(hi, int(info.max)))
            check_array_size(out.shape, wider.itemsize, what, max_bytes)
            out = out.astype(wider)
    if s == 1 and b == 0:
        out[k] = raw
        return out
    for r0 in range(0, n_rows, step):
        iblk = raw[r0 : r0 + step].astype(np.int64)
        iblk *= s
        iblk += b
        out[k, r0 : r0 + step] = iblk
    return out
