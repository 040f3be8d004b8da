"""CacheManager: uint8 files equal the prepared arrays, rebuild rules, parallel build, crash."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from dp_helpers import MODES, make_data_dir

from medinfer.data import CacheManager, DatasetMetadata, PrepareConfig, load_image, prepare_volume
from medinfer.data.cache import _build_lock, dequantize, quantize
from medinfer.errors import ConfigError, InvalidImageError


def _pt_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted((root / "processed").rglob("*.pt"))
    }


def _records(root: Path) -> list[Path]:
    return [p for p in (root / "processed").rglob("*.json") if not p.name.startswith(".")]


def test_build_and_load_match_prepare_within_quantisation(data_dir):
    cm = CacheManager(data_dir)
    report = cm.build_cache(num_workers=0)
    assert (report.built, report.unusable, report.up_to_date, report.failed) == (6, 1, 0, {})
    for entry in cm.metadata.images:
        if entry.study == "ct99":
            continue
        prepared = prepare_volume(load_image(data_dir / entry.path), entry.mode)
        assert prepared is not None
        cached = cm.load_image(entry.study, entry.image)
        names = list(prepared.channels)
        assert cached.dtype == np.float32 and cached.shape == (len(names), *prepared.shape)
        for i, name in enumerate(names):
            expected = dequantize(quantize(prepared.channels[name]))
            assert np.array_equal(cached[i], expected)
            assert np.abs(cached[i] - prepared.channels[name]).max() <= 1 / 510 + 1e-7
        assert np.array_equal(cm.load_mask(entry.study, entry.image), prepared.background)
        one = cm.load_image(entry.study, entry.image, window=names[-1])
        assert np.array_equal(one[0], cached[-1])
        # the NeuroVFM layout: processed/<study>/<stem>[_<window>].pt, <stem>_mask.pt
        stem = entry.image.removesuffix(".nii.gz")
        arrays = [f"{stem}_{n}.pt" for n in names] if entry.mode == "ct" else [f"{stem}.pt"]
        folder = cm.processed / entry.study
        for name, fname in zip(names, arrays, strict=True):
            t = torch.load(folder / fname, weights_only=True)
            assert t.dtype == torch.uint8 and tuple(t.shape) == (1, *prepared.shape)
            assert np.array_equal(t[0].numpy(), quantize(prepared.channels[name]))
        mask = torch.load(folder / f"{stem}_mask.pt", weights_only=True)
        assert mask.dtype == torch.uint8 and mask.shape == (prepared.background.size,)
        assert (folder / f"{stem}.json").is_file()
    with pytest.raises(InvalidImageError, match="unusable: 3 slices"):
        cm.load_image("ct99", "ct_thin.nii.gz")
    with pytest.raises(ConfigError, match="'bone' is not one of"):
        cm.load_image("mr00", "t1.nii.gz", window="bone")
    stats = cm.get_cache_stats()
    assert stats["images"] == 7 and stats["cached"] == 6 and stats["unusable"] == 1
    assert stats["missing"] == 0 and stats["stale"] == 0
    assert stats["by_mode"] == {"ct": 5, "mri": 1}
    # uint8 vs float32: 1/4, plus ~1 kB of torch.save framing per file on these tiny grids
    assert 0.24 < stats["size_ratio"] < 0.30
    assert "3 slices" in stats["unusable_reasons"]["ct99/ct_thin.nii.gz"]


def test_up_to_date_entries_are_kept_and_changed_sources_rebuilt(data_dir):
    cm = CacheManager(data_dir)
    cm.build_cache(num_workers=0)
    again = cm.build_cache(num_workers=0)
    assert (again.built, again.unusable, again.up_to_date) == (0, 0, 7)
    src = data_dir / "raw" / "ct00" / "ct_0.nii.gz"
    before = cm.load_image("ct00", "ct_0.nii.gz")
    # same content, new mtime: the content digest says up to date (signature refreshed)
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert cm.get_cache_stats()["stale"] == 1
    r = cm.build_cache(num_workers=0)
    assert (r.built, r.up_to_date) == (0, 7) and cm.get_cache_stats()["stale"] == 0
    # new content: rebuilt, and the cache shows the new content
    img = nib.load(str(src))
    arr = np.asarray(img.dataobj).copy()
    arr[arr == 30] = 60
    nib.save(nib.Nifti1Image(arr, img.affine), str(src))
    r = cm.build_cache(num_workers=0)
    assert (r.built, r.up_to_date) == (1, 6)
    after = cm.load_image("ct00", "ct_0.nii.gz")
    assert not np.array_equal(before, after)
    # other parameters: everything is rebuilt
    r = CacheManager(data_dir, config=PrepareConfig(token_foreground_fraction=0.2)).build_cache(
        num_workers=0
    )
    assert (r.built, r.unusable, r.up_to_date) == (6, 1, 0)


def test_parallel_build_equals_sequential_build(tmp_path):
    roots = []
    for name in ("seq", "par"):
        root = make_data_dir(tmp_path / name, n_ct_studies=1)
        DatasetMetadata.from_directory(root, MODES).save(root)
        roots.append(root)
    CacheManager(roots[0]).build_cache(num_workers=0)
    report = CacheManager(roots[1]).build_cache(num_workers=2)
    assert (report.built, report.unusable, report.failed) == (3, 1, {})
    seq, par = _pt_files(roots[0]), _pt_files(roots[1])
    assert len(seq) == 2 * 4 + 2 and seq == par  # ct: 3 windows + mask, mri: 1 + mask


def test_concurrent_build_is_refused(data_dir):
    cm = CacheManager(data_dir)
    with _build_lock(cm.processed), pytest.raises(ConfigError, match="another build_cache"):
        cm.build_cache(num_workers=0)


_SLOW_BUILD = textwrap.dedent(
    """
    import sys, time
    import medinfer.data.cache as c
    save = c._save_pt
    def slow_save(path, arr):
        time.sleep(0.04)
        return save(path, arr)
    c._save_pt = slow_save
    c.CacheManager(sys.argv[1]).build_cache(num_workers=0)
    """
)


def test_killed_build_is_completed_by_the_next_run(tmp_path):
    root = make_data_dir(tmp_path / "data", n_ct_studies=8)
    DatasetMetadata.from_directory(root, MODES).save(root)
    clean = make_data_dir(tmp_path / "clean", n_ct_studies=8)
    DatasetMetadata.from_directory(clean, MODES).save(clean)
    CacheManager(clean).build_cache(num_workers=0)
    total = len(DatasetMetadata.load(root).images)

    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_BUILD, str(root)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if len(_records(root)) >= 3:
            break
        time.sleep(0.005)
    time.sleep(0.05)  # land inside the next image (0.04 s per file written)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = _records(root)
    assert 3 <= len(committed) < total
    # a crash inside a write: a stray temporary file and a half-written array, no meta.json
    entry = root / "processed" / "ct07"
    entry.mkdir(parents=True, exist_ok=True)
    (entry / ".ct_0_brain.pt.abc123.part.pt").write_bytes(b"PK half")
    (entry / "ct_0_brain.pt").write_bytes(b"PK trunc")
    cm = CacheManager(root)
    with pytest.raises(InvalidImageError, match="not cached"):
        cm.load_image("ct07", "ct_0.nii.gz")

    report = cm.build_cache(num_workers=0)
    assert report.failed == {}
    assert report.built + report.unusable == total - len(committed) + 0
    assert report.up_to_date == len(committed)
    assert not [p for p in (root / "processed").rglob(".*") if p.name != ".build.lock"]
    assert _pt_files(root) == _pt_files(clean)
    for e in cm.metadata.images:
        if e.study != "ct99":
            assert cm.load_image(e.study, e.image).shape[0] in (1, 3)
    assert cm.get_cache_stats()["missing"] == 0


def test_workers_that_cannot_start_fall_back_to_in_process(data_dir, monkeypatch):
    import medinfer.data._cache_pool as pool

    def no_worker(self):
        raise OSError("no interpreter")

    monkeypatch.setattr(pool._Worker, "__init__", no_worker)
    report = CacheManager(data_dir).build_cache(num_workers=2)
    assert (report.built, report.unusable, report.failed) == (6, 1, {})
