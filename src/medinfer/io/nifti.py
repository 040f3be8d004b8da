"""NIfTI-1 / NIfTI-2 reading and writing (single-file ``.nii`` and ``.nii.gz``).

The reader decides on content (gzip magic, ``sizeof_hdr`` 348/540 and the magic
string), not on the file name, parses the header with nibabel, checks the voxel count
times the datatype size against the byte limit (:mod:`medinfer.io._limits`) *before*
allocating, checks that the file holds that many bytes (plain files: by size, before
reading; gzip: while decompressing), and converts every decoding failure into
:class:`~medinfer.errors.InvalidImageError`.

Axis convention: a 3-D image ``(I, J, K)`` becomes ``(1, I, J, K)``; a 4-D image
``(I, J, K, T)`` becomes ``(T, I, J, K)``; a 5-D vector image ``(I, J, K, 1, C)``
becomes ``(C, I, J, K)``; 1-D and 2-D images get trailing axes of length 1. The writer
does the inverse (one channel -> 3-D file, C channels -> 4-D file with ``dim[4] = C``).

Geometry: the affine is nibabel's "best affine" (sform if ``sform_code > 0``, else
qform if ``qform_code > 0``, else the pixdim-only fallback; codes the standard does not
define, e.g. negative ones, count as 0 = unset, as nibabel's header check fixes them, and
``meta["nifti"]`` records the codes so read), converted to millimetres
from the header's spatial unit (``meter``/``micron``; ``unknown`` is taken as mm).
NIfTI world coordinates are RAS+, so no axis flip is needed.

``Volume.meta["nifti"]`` keeps the source header facts: ``version`` (1 or 2),
``datatype`` (numpy name of the stored type), ``scl_slope`` / ``scl_inter`` (``None``
when the file was not scaled), ``qform_code``, ``sform_code``, ``affine_source``
(``"sform" | "qform" | "pixdim"``), ``spatial_unit``, ``temporal_unit``,
``time_step`` (pixdim[4]), ``intent_code``, ``descrip`` and ``dim``. The writer reuses
the codes, the temporal unit / time step, and the scaling when the data are exactly
representable in the source's stored integer type with the source's slope and
intercept (so a scaled uint16 file read and written unchanged is written the same way).

Reference: NIfTI-1 header (nifti1.h, NIfTI DFWG 2004), NIfTI-2 (nifti2.h, 2011).
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError

from medinfer._atomic import atomic_path
from medinfer.errors import ConfigError, InvalidImageError
from medinfer.io._dtypes import smallest_int_dtype
from medinfer.io._limits import check_array_size
from medinfer.io.sniff import gzip_errors_as_invalid, nifti_version, read_head
from medinfer.volume import Volume

__all__ = ["NIFTI_SUFFIXES", "check_nifti_header", "derived_from", "read_nifti", "write_nifti"]

#: accepted output suffixes
NIFTI_SUFFIXES = (".nii", ".nii.gz")

_HEADER_SIZE = {1: 348, 2: 540}
#: header plus the 4-byte extension flag: where voxel data start in files we write
_DATA_OFFSET = {1: 352, 2: 544}
_UNIT_TO_MM = {"unknown": 1.0, "mm": 1.0, "meter": 1000.0, "micron": 1e-3}
_NIFTI1_MAX_DIM = 32767
_CHUNK = 1 << 24  # bytes per read call while decompressing
_SCALE_BLOCK = 1 << 20  # raw bytes per block when scaling while reading
_MAX_VOX_OFFSET = 1 << 26  # 64 MiB of header extensions at most


# ----------------------------------------------------------------------------- reading
def read_nifti(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> Volume:
    """Read a single-file NIfTI-1/2 image (plain or gzip, whatever the suffix).

    Parameters
    ----------
    path : the ``.nii`` / ``.nii.gz`` file.
    max_bytes : upper bound on the returned array's size in bytes (default
        :data:`medinfer.io._limits.DEFAULT_MAX_BYTES`, 4 GiB, or ``MEDINFER_MAX_IMAGE_BYTES``).

    Returns
    -------
    Volume
        ``array`` ``(C, I, J, K)`` (see the module docstring for 4-D/5-D files) in the
        stored dtype (native byte order), or float32 when the header scales the data
        (``scl_slope`` not 0/1 or ``scl_inter`` not 0; float64 when the stored type is
        32/64-bit or float64, or when scaled integers would overflow float32). Peak
        memory is the returned array plus a 1 MiB block (scaling is applied block by
        block while reading); ``affine`` voxel -> RAS+ mm; ``meta`` with ``format``
        ``"nifti"``, ``source`` and the ``nifti`` header facts.

    Raises
    ------
    InvalidImageError
        Not a NIfTI file (e.g. a text file named ``.nii.gz``), a corrupt or truncated
        gzip stream, fewer voxel bytes than the header announces, an unsupported
        datatype (RGB, complex), dims that are not positive, a header/image pair
        (``.hdr``/``.img``), or an unreadable header.
    ResourceLimitError
        The header's voxel count times the element size exceeds ``max_bytes``
        (checked before anything is allocated).
    InvalidImageError
        Scaled integer values beyond the float64 range.
    GeometryError
        The header's affine is singular or not finite.
    """
    p = Path(path)
    hdr, version, gz, file_shape, vol_shape = _checked_header(p, max_bytes)
    raw_dtype = _raw_dtype(p, hdr)
    slope, inter = _slope_inter(p, hdr)
    scaled = slope is not None
    out_dtype = _scaled_dtype(raw_dtype) if scaled else raw_dtype.newbyteorder("=")
    if slope is not None and inter is not None:
        out_dtype = _finite_scaled_dtype(p, raw_dtype, slope, inter, out_dtype)
    n_vox = int(np.prod(file_shape, dtype=object))
    n_bytes = n_vox * raw_dtype.itemsize
    vox_offset = float(hdr["vox_offset"])
    if not np.isfinite(vox_offset) or vox_offset > _MAX_VOX_OFFSET:
        raise InvalidImageError(
            f"{p}: NIfTI vox_offset {vox_offset} is not a plausible data offset "
            f"(at most {_MAX_VOX_OFFSET} bytes of header and extensions are accepted)"
        )
    offset = max(int(vox_offset), _DATA_OFFSET[version])
    if not gz:
        size = p.stat().st_size
        if size < offset + n_bytes:
            raise InvalidImageError(
                f"{p}: truncated NIfTI file: the header announces {n_bytes:,} bytes of voxel "
                f"data at offset {offset} but the file has only {size:,} bytes"
            )
    affine, spatial_unit = _affine_mm(p, hdr)

    if slope is not None and inter is not None:
        # scaled block by block into the output: peak memory is the output array plus
        # one block, never the raw buffer and the output together
        flat = _read_voxels_scaled(p, gz, offset, n_vox, raw_dtype, slope, inter, out_dtype)
        data = flat.reshape(file_shape, order="F")
    else:
        raw = _read_voxels(p, gz, offset, n_bytes).view(raw_dtype)
        if not raw.dtype.isnative:
            raw = raw.byteswap(inplace=True).view(out_dtype)  # in place: no second copy
        data = raw.reshape(file_shape, order="F")
    array = data.reshape(vol_shape[1:] + (vol_shape[0],), order="F")
    array = np.moveaxis(array, -1, 0)
    if array.shape[0] == 1:
        array = array[0]

    _, t_unit = _units(p, hdr)
    pixdim = [float(x) for x in hdr["pixdim"]]
    meta_nifti: dict[str, Any] = {
        "version": version,
        "datatype": raw_dtype.newbyteorder("=").name,
        "scl_slope": slope,
        "scl_inter": inter,
        "qform_code": _xform_code(hdr, "qform_code"),
        "sform_code": _xform_code(hdr, "sform_code"),
        "affine_source": _affine_source(hdr),
        "spatial_unit": spatial_unit,
        "temporal_unit": t_unit,
        "time_step": pixdim[4] if len(file_shape) >= 4 else None,
        "intent_code": int(hdr["intent_code"]),
        "descrip": _text(hdr["descrip"]),
        "dim": [int(s) for s in file_shape],
    }
    return Volume(array, affine, {"format": "nifti", "source": str(p), "nifti": meta_nifti})


def check_nifti_header(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> None:
    """Check a NIfTI file's header without reading its voxels (cheap, imports no torch).

    The checks :func:`read_nifti` does before reading voxel data: content is NIfTI-1/2
    (plain or gzip), single-file, readable header, supported dims and datatype, and the
    voxel count times the element size within ``max_bytes``. Used by the CLI to refuse
    bad input before anything heavy (torch, the model) is loaded.

    Raises
    ------
    InvalidImageError, ResourceLimitError
        As :func:`read_nifti`.
    """
    _checked_header(Path(path), max_bytes)


def _checked_header(
    p: Path, max_bytes: int | None
) -> tuple[Any, int, bool, tuple[int, ...], tuple[int, int, int, int]]:
    """(header, version, gzip, file shape, Volume shape) after the pre-read checks."""
    head, gz = read_head(p, 544)
    version = nifti_version(head)
    if version is None:
        kind = "a gzip file without a NIfTI header" if gz else "not a NIfTI file"
        raise InvalidImageError(
            f"{p}: {kind} (starts with {head[:16]!r}); expected a NIfTI-1/2 header "
            "(sizeof_hdr 348 or 540 with magic n+1/n+2)"
        )
    hdr = _parse_header(p, head, version)
    magic = bytes(np.asarray(hdr["magic"]).tobytes()).rstrip(b"\x00")
    if magic in (b"ni1", b"ni2"):
        raise InvalidImageError(
            f"{p}: the header of a NIfTI header/image pair (.hdr/.img, magic {magic!r}); "
            "only single-file NIfTI (.nii, .nii.gz) is supported"
        )
    file_shape, vol_shape = _shapes(p, hdr)
    raw_dtype = _raw_dtype(p, hdr)
    slope, _ = _slope_inter(p, hdr)
    out_dtype = _scaled_dtype(raw_dtype) if slope is not None else raw_dtype.newbyteorder("=")
    # the reader holds the output array (plus one block of _SCALE_BLOCK bytes when scaling)
    check_array_size(file_shape, out_dtype.itemsize, str(p), max_bytes)
    return hdr, version, gz, file_shape, vol_shape


def _parse_header(p: Path, head: bytes, version: int) -> Any:
    cls = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    try:
        return cls.from_fileobj(io.BytesIO(head[: _HEADER_SIZE[version]]), check=False)
    except (HeaderDataError, ValueError, KeyError, TypeError) as exc:
        raise InvalidImageError(f"{p}: unreadable NIfTI-{version} header ({exc})") from None


def _shapes(p: Path, hdr: Any) -> tuple[tuple[int, ...], tuple[int, int, int, int]]:
    """(shape stored in the file, Volume shape (C, I, J, K))."""
    dim = [int(d) for d in hdr["dim"]]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise InvalidImageError(f"{p}: NIfTI dim[0] = {ndim}; expected 1 to 7 dimensions")
    shape = tuple(dim[1 : 1 + ndim])
    if any(s < 1 for s in shape):
        raise InvalidImageError(
            f"{p}: NIfTI dimensions {list(shape)} contain a size < 1; every size must be >= 1"
        )
    spatial = (shape + (1, 1, 1))[:3]
    extra = list(shape[3:])
    t = extra[0] if len(extra) >= 1 else 1
    c = extra[1] if len(extra) >= 2 else 1
    if any(s != 1 for s in extra[2:]) or (t > 1 and c > 1):
        raise InvalidImageError(
            f"{p}: NIfTI dimensions {list(shape)} are not supported; accepted: 3-D, 4-D "
            "(I, J, K, T) or 5-D vector images (I, J, K, 1, C)"
        )
    channels = t * c
    return shape, (channels, spatial[0], spatial[1], spatial[2])


def _raw_dtype(p: Path, hdr: Any) -> np.dtype[Any]:
    code = int(hdr["datatype"])
    try:
        dt = np.dtype(hdr.get_data_dtype())
    except (HeaderDataError, KeyError, TypeError, ValueError):
        raise InvalidImageError(
            f"{p}: NIfTI datatype code {code} is unknown; accepted: integer and float types"
        ) from None
    if dt.fields is not None or dt.kind not in "uif" or dt.itemsize > 8:
        raise InvalidImageError(
            f"{p}: NIfTI datatype {code} ({dt}) is not supported; accepted: integer and "
            "real float types (not RGB, complex or float128)"
        )
    return dt


def _slope_inter(p: Path, hdr: Any) -> tuple[float | None, float | None]:
    """(slope, inter) when the header scales the data, else (None, None)."""
    slope = float(hdr["scl_slope"])
    inter = float(hdr["scl_inter"])
    if slope == 0.0 or np.isnan(slope):
        return None, None  # NIfTI: scl_slope 0 means "no scaling"
    if np.isnan(inter):
        inter = 0.0
    if not (np.isfinite(slope) and np.isfinite(inter)):
        raise InvalidImageError(
            f"{p}: NIfTI scaling scl_slope={slope}, scl_inter={inter} is not finite"
        )
    if slope == 1.0 and inter == 0.0:
        return None, None
    return slope, inter


def _scaled_dtype(raw_dtype: np.dtype[Any]) -> np.dtype[Any]:
    """float32, or float64 when float32 would lose stored precision."""
    if (raw_dtype.kind in "iu" and raw_dtype.itemsize >= 4) or (
        raw_dtype.kind == "f" and raw_dtype.itemsize == 8
    ):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _finite_scaled_dtype(
    p: Path, raw_dtype: np.dtype[Any], slope: float, inter: float, out_dtype: np.dtype[Any]
) -> np.dtype[Any]:
    """``out_dtype``, or float64 when scaled integers would overflow float32 to inf.

    Raises
    ------
    InvalidImageError
        Scaled integer values would not be finite even in float64.
    """
    if raw_dtype.kind not in "iu":
        return out_dtype  # stored floats: non-finite values are the file's content
    info = np.iinfo(raw_dtype)
    top = max(abs(float(info.min)), abs(float(info.max))) * abs(slope) + abs(inter)
    if top <= float(np.finfo(out_dtype).max):
        return out_dtype
    if np.isfinite(top) and top <= float(np.finfo(np.float64).max):
        return np.dtype(np.float64)
    raise InvalidImageError(
        f"{p}: NIfTI scaling scl_slope={slope:g}, scl_inter={inter:g} maps {raw_dtype.name} "
        "values beyond the float64 range"
    )


def _apply_scaling(
    raw: np.ndarray, slope: float, inter: float, out_dtype: np.dtype[Any]
) -> np.ndarray:
    """``raw * slope + inter`` computed in ``out_dtype`` (the reader's exact formula)."""
    out = raw.astype(out_dtype)
    out *= out_dtype.type(slope)
    out += out_dtype.type(inter)
    return out


def _units(p: Path, hdr: Any) -> tuple[str, str]:
    try:
        xyz, t = hdr.get_xyzt_units()
    except (KeyError, ValueError):
        raise InvalidImageError(
            f"{p}: NIfTI xyzt_units = {int(hdr['xyzt_units'])} holds an unknown unit code"
        ) from None
    return str(xyz), str(t)


#: xform codes the NIfTI standard defines (nifti1.h NIFTI_XFORM_*; 5 = template, NIfTI-2)
_VALID_XFORM_CODES = frozenset({1, 2, 3, 4, 5})


def _xform_code(hdr: Any, key: str) -> int:
    """The code as the standard (and nibabel's header check) reads it: unknown -> 0."""
    code = int(hdr[key])
    return code if code in _VALID_XFORM_CODES else 0


def _affine_source(hdr: Any) -> str:
    if _xform_code(hdr, "sform_code") > 0:
        return "sform"
    if _xform_code(hdr, "qform_code") > 0:
        return "qform"
    return "pixdim"


def _affine_mm(p: Path, hdr: Any) -> tuple[np.ndarray, str]:
    xyz, _ = _units(p, hdr)
    factor = _UNIT_TO_MM.get(xyz)
    if factor is None:
        raise InvalidImageError(
            f"{p}: NIfTI spatial unit {xyz!r} is not a length; accepted: mm, meter, micron"
        )
    try:
        source = _affine_source(hdr)
        if source == "sform":
            best = hdr.get_sform()
        elif source == "qform":
            best = hdr.get_qform()
        else:
            best = hdr.get_base_affine()
        affine = np.array(best, dtype=np.float64)
    except (HeaderDataError, ValueError, np.linalg.LinAlgError) as exc:
        raise InvalidImageError(f"{p}: invalid NIfTI qform/sform ({exc})") from None
    affine[:3, :] *= factor
    return affine, xyz


def _read_voxels(p: Path, gz: bool, offset: int, n_bytes: int) -> np.ndarray:
    """Read ``n_bytes`` starting at ``offset`` into a new uint8 array."""
    buf = np.empty(n_bytes, dtype=np.uint8)
    view = memoryview(buf)  # type: ignore[arg-type]
    with gzip_errors_as_invalid(p):
        with open(p, "rb") as raw_f:
            f: Any = gzip.GzipFile(fileobj=raw_f, mode="rb") if gz else raw_f
            _skip(f, offset)
            got = 0
            while got < n_bytes:
                n = f.readinto(view[got : got + _CHUNK])
                if not n:
                    break
                got += n
            if got < n_bytes:
                raise InvalidImageError(
                    f"{p}: truncated NIfTI data: the header announces {n_bytes:,} bytes of "
                    f"voxel data but only {got:,} are present"
                )
            if gz:
                f.read(1 << 16)  # reach end of stream when nothing follows: checks the CRC
    return buf


def _read_voxels_scaled(
    p: Path,
    gz: bool,
    offset: int,
    n_vox: int,
    raw_dtype: np.dtype[Any],
    slope: float,
    inter: float,
    out_dtype: np.dtype[Any],
) -> np.ndarray:
    """Read ``n_vox`` stored values and return ``raw * slope + inter`` as a flat array.

    The same formula and precision as :func:`_apply_scaling` (computed in ``out_dtype``),
    applied block by block so that only one block of raw bytes is held at a time.
    """
    out = np.empty(n_vox, dtype=out_dtype)
    item = raw_dtype.itemsize
    per = max(1, _SCALE_BLOCK // item)
    block = np.empty(per * item, dtype=np.uint8)
    view = memoryview(block)  # type: ignore[arg-type]
    s, b = out_dtype.type(slope), out_dtype.type(inter)
    with gzip_errors_as_invalid(p):
        with open(p, "rb") as raw_f:
            f: Any = gzip.GzipFile(fileobj=raw_f, mode="rb") if gz else raw_f
            _skip(f, offset)
            done = 0
            while done < n_vox:
                m = min(per, n_vox - done)
                want = m * item
                got = 0
                while got < want:
                    n = f.readinto(view[got:want])
                    if not n:
                        break
                    got += n
                if got < want:
                    raise InvalidImageError(
                        f"{p}: truncated NIfTI data: the header announces {n_vox * item:,} "
                        f"bytes of voxel data but only {done * item + got:,} are present"
                    )
                seg = out[done : done + m]
                seg[...] = block[:want].view(raw_dtype)
                seg *= s
                seg += b
                done += m
            if gz:
                f.read(1 << 16)  # reach end of stream when nothing follows: checks the CRC
    return out


def _skip(f: IO[bytes], offset: int) -> None:
    left = offset
    while left > 0:
        chunk = f.read(min(left, _CHUNK))
        if not chunk:
            raise EOFError("file ends inside the header")
        left -= len(chunk)


def _text(value: Any) -> str:
    return bytes(np.asarray(value).tobytes()).split(b"\x00", 1)[0].decode("latin-1").strip()


# ----------------------------------------------------------------------------- writing
def write_nifti(
    volume: Volume, path: str | os.PathLike[str], *, compresslevel: int = 6
) -> Path:
    """Write ``volume`` as single-file NIfTI, atomically; return the final path.

    Parameters
    ----------
    volume : the image; 1 channel is written 3-D ``(I, J, K)``, C > 1 channels 4-D
        ``(I, J, K, C)``.
    path : ends with ``.nii`` (plain) or ``.nii.gz`` (gzip).
    compresslevel : gzip level 1 (fast) to 9 (small), for ``.nii.gz``.

    Stored type: ``bool`` -> uint8; int8/uint8/int16/uint16 and float32/float64 as they
    are; wider integers (e.g. int64 label maps from ``argmax``) -> the smallest of uint8,
    uint16 (non-negative) / int16, int32, int64 that holds their range; float16 ->
    float32. Float data carrying ``meta["nifti"]`` scaling from an integer source are
    written back with that stored type and ``scl_slope``/``scl_inter`` when this is
    exact. NIfTI-2 is used only when a dimension exceeds 32767.

    Header: sform (exact affine) and qform (rigid + zoom) both from the affine, with the
    source's codes from ``meta["nifti"]`` carried unchanged when present, else 1/1
    (scanner); qform code 0 when the affine cannot be expressed as a qform (sheared),
    see :func:`_set_xforms`; spatial unit mm; temporal unit and pixdim[4] reused for 4-D
    data. ``meta["intent"] == "label"`` (label maps) sets ``intent_code``
    NIFTI_INTENT_LABEL (1002) and ``cal_min`` / ``cal_max`` 0 / largest label.

    Raises
    ------
    ConfigError
        ``path`` does not end with ``.nii`` or ``.nii.gz``; bad ``compresslevel``.
    InvalidImageError
        The array dtype cannot be stored in NIfTI (complex, object, strings).
    """
    p = Path(path)
    name = p.name.lower()
    if not name.endswith(NIFTI_SUFFIXES):
        raise ConfigError(
            f"{p}: output suffix not supported for NIfTI; use one of {', '.join(NIFTI_SUFFIXES)}"
        )
    if not 1 <= int(compresslevel) <= 9:
        raise ConfigError(f"compresslevel: {compresslevel!r}; accepted: 1 to 9")
    compress = name.endswith(".gz")
    src: Mapping[str, Any] = volume.meta.get("nifti") or {}

    arr = volume.array
    data = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    data, slope, inter = _stored(data, src, p)
    version = 2 if max(data.shape) > _NIFTI1_MAX_DIM else 1
    hdr = nib.Nifti1Header() if version == 1 else nib.Nifti2Header()
    hdr.set_data_dtype(data.dtype)
    hdr.set_data_shape(data.shape)
    _set_xforms(hdr, volume.affine, src)
    if str(volume.meta.get("intent") or "") == "label":
        hdr.set_intent("label")
        hdr["cal_min"] = 0.0
        hdr["cal_max"] = float(data.max()) if data.size else 0.0
    t_unit = str(src.get("temporal_unit") or "unknown")
    if t_unit not in ("sec", "msec", "usec", "hz", "ppm", "rads", "unknown"):
        t_unit = "unknown"
    hdr.set_xyzt_units("mm", t_unit)
    if data.ndim == 4 and src.get("time_step"):
        pixdim = hdr["pixdim"]
        pixdim[4] = float(src["time_step"])
        hdr["pixdim"] = pixdim
    hdr["scl_slope"] = 1.0 if slope is None else slope
    hdr["scl_inter"] = 0.0 if inter is None else inter
    hdr["vox_offset"] = _DATA_OFFSET[version]
    hdr["descrip"] = b"medinfer"
    header_bytes = hdr.binaryblock + b"\x00\x00\x00\x00"  # no extensions
    stored = np.dtype(hdr.get_data_dtype())

    with atomic_path(p) as tmp, open(tmp, "wb") as raw_f:
        if compress:
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=raw_f, compresslevel=int(compresslevel), mtime=0
            ) as g:
                _write_payload(g, header_bytes, data, stored)
        else:
            _write_payload(raw_f, header_bytes, data, stored)
    return p


def derived_from(output: Volume, source: Volume, *, label_map: bool = False) -> Volume:
    """``output`` (a result on the grid of ``source``) with the meta :func:`write_nifti` uses.

    Carries the source's NIfTI ``qform_code`` / ``sform_code`` (only those: the source's
    datatype and scaling do not apply to a result; the output's own ``meta["nifti"]``
    entries, e.g. a requested encoding, are kept) and, with ``label_map``, marks the
    volume as a label map (``intent_code`` NIFTI_INTENT_LABEL). Array and affine are
    shared, not copied.
    """
    src = source.meta.get("nifti") or {}
    codes = {k: int(src[k]) for k in ("qform_code", "sform_code") if src.get(k) is not None}
    meta = {k: v for k, v in output.meta.items() if k not in ("nifti", "intent")}
    own = output.meta.get("nifti") if output.meta.get("nifti") is not source.meta.get(
        "nifti") else None
    meta["nifti"] = {**(own or {}), **codes}
    if label_map:
        meta["intent"] = "label"
    return Volume(output.array, output.affine, meta)


def _set_xforms(hdr: Any, affine: np.ndarray, src: Mapping[str, Any]) -> None:
    """sform / qform of ``hdr`` from ``affine`` with the source's codes, kept consistent.

    Codes: the source's ``qform_code`` / ``sform_code`` (``meta["nifti"]``) are carried
    as they are (e.g. 2/2, 0/2, 0/4); a source without codes (or a non-NIfTI source)
    gets 1/1 (scanner). The sform always holds the exact affine when its code is > 0.
    The qform can only hold a rigid rotation (possibly with qfac -1) times zooms; when
    the affine is not of that form (a sheared or non-orthogonal sform: nibabel's nearest
    rigid qform differs from it by more than 1e-5 of the voxel size in the matrix or
    1e-4 mm in the offset), the qform code is
    set to 0 (qform unused) and the sform code to the source's code (or 1), so that
    nibabel and ITK never read two different grids (ITK then refuses the file, which
    it cannot represent, rather than reading the qform grid).
    """
    qcode = int(src.get("qform_code") or 0)
    scode = int(src.get("sform_code") or 0)
    if qcode <= 0 and scode <= 0:
        qcode = scode = 1
    hdr.set_qform(affine, code=max(qcode, 1))
    q = hdr.get_qform()
    zoom = float(np.linalg.norm(affine[:3, :3], axis=0).max())
    if not (
        np.allclose(q[:3, :3], affine[:3, :3], rtol=0.0, atol=1e-5 * zoom)
        and np.allclose(q[:3, 3], affine[:3, 3], rtol=1e-6, atol=1e-4)
    ):
        hdr.set_qform(None, code=0)
        scode = scode if scode > 0 else qcode
        qcode = 0
    elif qcode <= 0:
        hdr.set_qform(None, code=0)
    else:
        hdr.set_qform(affine, code=qcode)
    pixdim = hdr["pixdim"]
    pixdim[1:4] = np.linalg.norm(affine[:3, :3], axis=0)
    hdr["pixdim"] = pixdim
    if scode > 0:
        hdr.set_sform(affine, code=scode)
    else:
        hdr.set_sform(None, code=0)


def _write_payload(f: Any, header: bytes, data: np.ndarray, stored: np.dtype[Any]) -> None:
    """Header, then voxels in Fortran order, one (I, J) slab at a time (bounded memory)."""
    f.write(header)
    if data.ndim < 3:
        f.write(np.asarray(data, dtype=stored).tobytes(order="F"))
        return
    rest = data.shape[2:]
    for idx in np.ndindex(*reversed(rest)):
        slab = data[(slice(None), slice(None), *reversed(idx))]
        f.write(np.asarray(slab, dtype=stored).tobytes(order="F"))


def _stored(
    data: np.ndarray, src: Mapping[str, Any], p: Path
) -> tuple[np.ndarray, float | None, float | None]:
    """(data in the stored dtype, slope, inter) following the policy of :func:`write_nifti`."""
    dt = data.dtype
    if dt == np.bool_:
        return data.astype(np.uint8), None, None
    if dt.kind in "iu":
        if dt.itemsize <= 2:
            return data, None, None
        if data.size == 0:
            return data.astype(np.uint8), None, None
        return data.astype(smallest_int_dtype(int(data.min()), int(data.max()))), None, None
    if dt.kind == "f":
        if dt.itemsize < 4:
            return data.astype(np.float32), None, None
        if dt.itemsize > 8:
            return data.astype(np.float64), None, None
        enc = _encode_with_source_scaling(data, src)
        if enc is not None:
            return enc
        return data, None, None
    raise InvalidImageError(
        f"{p}: cannot store array dtype {dt} in NIfTI; accepted: bool, integer, float"
    )


def _encode_with_source_scaling(
    data: np.ndarray, src: Mapping[str, Any]
) -> tuple[np.ndarray, float, float] | None:
    slope, inter, name = src.get("scl_slope"), src.get("scl_inter"), src.get("datatype")
    if slope is None or name is None:
        return None
    try:
        raw_dtype = np.dtype(str(name))
    except TypeError:
        return None
    if raw_dtype.kind not in "iu" or _scaled_dtype(raw_dtype) != data.dtype:
        return None
    slope, inter = float(slope), float(inter or 0.0)
    # the header stores float32 (NIfTI-1): use what a reader will see
    slope = float(np.float32(slope)) if data.dtype == np.float32 else slope
    inter = float(np.float32(inter)) if data.dtype == np.float32 else inter
    if slope == 0.0 or not np.isfinite(slope) or not np.isfinite(inter):
        return None
    if not np.all(np.isfinite(data)):
        return None
    raw = np.rint((data.astype(np.float64) - inter) / slope)
    info = np.iinfo(raw_dtype)
    if raw.size and (raw.min() < info.min or raw.max() > info.max):
        return None
    raw_i = raw.astype(raw_dtype)
    if not np.array_equal(_apply_scaling(raw_i, slope, inter, data.dtype), data):
        return None
    return raw_i, slope, inter
