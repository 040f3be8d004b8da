"""The fast SEG save (pre-encoded Per-frame Functional Groups) writes exactly the bytes
pydicom's ``Dataset.save_as`` writes, for BINARY, LABELMAP (RLE) and FRACTIONAL SEGs with
a non-ASCII segment label (issue 12, acceptance 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from io_helpers import GEOMETRIES, random_volume

import medinfer.io._seg_encode as seg_encode
from medinfer.io import read_dicom
from medinfer.io.dicom_seg import read_dicom_seg, write_dicom_seg
from medinfer.io.dicom_writer import write_dicom_series
from medinfer.models import resolve_model


def test_fast_save_equals_pydicom_save(tmp_path, monkeypatch):
    folder = tmp_path / "series"
    write_dicom_series(random_volume(GEOMETRIES["las_oblique"], (14, 11, 6)), folder,
                       modality="CT", shuffle_seed=3)
    src = read_dicom(folder)
    lab = np.zeros(src.spatial_shape, np.uint8)
    lab[2:9, 3:8, 1:4] = 1
    lab[9:13, 1:6, 2:6] = 3
    lab[4:7, 8:10, 0:2] = 7
    label = src.with_array(lab[None])
    prob = np.zeros((4, *src.spatial_shape), np.float32)
    prob[1] = lab == 1
    prob[3] = 0.4 * (lab == 3)
    card = resolve_model("demo-brain")[0]
    pairs: list[tuple[bytes, bytes]] = []
    fast = seg_encode.save_multiframe

    def both(ds, path):
        # the fast path is taken (no fallback to save_as)
        assert seg_encode.encode_sequence_explicit_le(
            list(ds.PerFrameFunctionalGroupsSequence), ["iso8859"]) is not None
        fast(ds, path)
        ref = Path(f"{path}.ref")
        ds.save_as(ref)  # the dataset is unchanged by the fast save
        pairs.append((Path(path).read_bytes(), ref.read_bytes()))

    monkeypatch.setattr(seg_encode, "save_multiframe", both)
    meta = {3: {"name": "Läsion grün"}}
    for i, kw in enumerate(({}, {"seg_type": "labelmap", "compression": "rle"},
                            {"seg_type": "fractional",
                             "probabilities": src.with_array(prob)})):
        p = write_dicom_seg(label, folder, card, tmp_path / f"seg{i}.dcm", metadata=meta,
                            **kw)  # type: ignore[arg-type]
        back = read_dicom_seg(p, reference=folder).array[0]
        want = lab if i < 2 else np.where(lab == 1, 1, 0)
        assert np.array_equal(back, want)
    assert len(pairs) == 3
    for ours, ref in pairs:
        assert len(ours) > 1000
        assert ours == ref
