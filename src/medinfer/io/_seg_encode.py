"""Fast saving of multi-frame DICOM objects with large per-frame functional groups.

pydicom encodes every element of every sequence item through its generic writer; a SEG
with 10^4 frames has ~10^5 such elements in its Per-frame Functional Groups Sequence
(5200,9230), most of them repeated (the same source-image references, positions and
segment numbers for many frames). :func:`save_multiframe` encodes that sequence once,
memoising the bytes of each leaf element (produced by pydicom's own
``write_data_element``) and of each item shared between frames, so the output is byte
for byte what ``Dataset.save_as`` writes (explicit VR little endian, defined lengths;
the tests compare both), and hands the result to pydicom as a pre-encoded element.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["encode_sequence_explicit_le", "save_multiframe"]

_PFFG = 0x52009230
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)


def encode_sequence_explicit_le(items: list[Dataset], encodings: list[str]) -> bytes | None:
    """The value bytes of a sequence of ``items`` in explicit VR little endian.

    Items and nested sequences get defined lengths, as pydicom writes new datasets.
    Returns ``None`` when an item holds something this encoder leaves to pydicom
    (raw, ambiguous-VR or undefined-length elements, undefined-length items).
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    memo: dict[tuple[int, str, str, str], bytes] = {}

    def leaf(elem: object) -> bytes:
        # repr: exact for ints, floats, numpy scalars (typed), strings and the DS
        # original string; str: the DS text as written (auto-formatted or not)
        value = elem.value  # type: ignore[attr-defined]
        key = (elem.tag, elem.VR, repr(value), str(value))  # type: ignore[attr-defined]
        out = memo.get(key)
        if out is None:
            buf = DicomBytesIO()
            buf.is_little_endian = True
            buf.is_implicit_VR = False
            write_data_element(buf, elem, encodings)  # type: ignore[arg-type]
            out = memo[key] = buf.getvalue()
        return out

    class _Unsupported(Exception):
        pass

    # items shared between frames (highdicom reuses the plane position and source-image
    # items of a slice for all its segments): encoded once, by identity; ``seen`` keeps
    # them alive so that an id is not reused while encoding
    by_id: dict[int, bytes] = {}
    seen: list[Dataset] = []

    def dataset(ds: Dataset) -> bytes:
        out = by_id.get(id(ds))
        if out is None:
            out = by_id[id(ds)] = encode(ds)
            seen.append(ds)
        return out

    def encode(ds: Dataset) -> bytes:
        if getattr(ds, "is_undefined_length_sequence_item", False):
            raise _Unsupported
        parts = []
        for tag in sorted(ds.keys()):
            if tag.element == 0 and tag.group > 6:
                continue
            elem = ds.get_item(tag)
            vr = elem.VR
            if elem.is_raw or vr is None or len(vr) != 2 or elem.is_undefined_length:
                raise _Unsupported
            if vr == "SQ":
                body = sequence(elem.value)
                parts.append(struct.pack("<HH2sHI", tag.group, tag.element, b"SQ", 0,
                                         len(body)))
                parts.append(body)
            else:
                parts.append(leaf(elem))
        return b"".join(parts)

    def sequence(seq: list[Dataset]) -> bytes:
        parts = []
        for item in seq:
            body = dataset(item)
            parts.append(_ITEM + struct.pack("<I", len(body)))
            parts.append(body)
        return b"".join(parts)

    try:
        return sequence(items)
    except _Unsupported:
        return None


def save_multiframe(ds: Dataset, path: str | os.PathLike[str]) -> None:
    """``ds.save_as(path)`` with the Per-frame Functional Groups Sequence pre-encoded.

    Same bytes as ``ds.save_as(path)``; falls back to it for transfer syntaxes other
    than explicit VR little endian (with native or encapsulated pixel data) or content
    the fast path does not cover. ``ds`` is left as it was.
    """
    from pydicom.charset import convert_encodings
    from pydicom.dataelem import RawDataElement
    from pydicom.filewriter import correct_ambiguous_vr
    from pydicom.tag import Tag

    meta = getattr(ds, "file_meta", None)
    tsyntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    deflated = tsyntax == "1.2.840.10008.1.2.1.99"
    implicit_or_big = tsyntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.2")
    if _PFFG not in ds or deflated or implicit_or_big or not tsyntax:
        ds.save_as(path)
        return
    encodings = convert_encodings(ds.get("SpecificCharacterSet", None) or "iso8859")
    original = ds.get_item(_PFFG)
    body = encode_sequence_explicit_le(list(original.value), encodings)
    if body is None:
        ds.save_as(path)
        return
    encoding = (ds._read_implicit, ds._read_little, ds.original_character_set)
    del ds[_PFFG]
    try:
        # what save_as does to a new dataset (ambiguous VRs resolved), minus the frames
        correct_ambiguous_vr(ds, True)
        ds[_PFFG] = RawDataElement(
            Tag(_PFFG), "SQ", len(body), body, 0, False, True)
        ds.set_original_encoding(False, True, ds._character_set)
        ds.save_as(path)
    finally:
        ds[_PFFG] = original
        ds.set_original_encoding(encoding[0], encoding[1], encoding[2])
