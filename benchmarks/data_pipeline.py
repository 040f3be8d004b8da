"""Benchmark: the training data pipeline on the real CT and MRI of the test data.

Inputs (in the repository, see DATA_NOTICE.md): ``tests/data_pipeline/data/
ct_head_1mm_air.nii.gz`` (head CT, int16 HU, 202x202x179, 1 mm) and
``mni152_t1_1mm.nii.gz`` (T1 MRI, uint8, 197x233x189, 1 mm). Also a derived
"clinical-size" CT (the same CT resampled in memory to 0.5 x 0.5 x 1 mm, 404x404x179) to
show how preparation time grows with the input grid.

Measured, each as the median of ``--repeats`` runs after one warm-up run:

- ``prepare``: :func:`medinfer.data.prepare_for_inference` from a loaded Volume
  (RPI, anti-aliasing, resampling to 1 x 1 x 4 mm, windows / percentiles, crop/pad,
  token mask); ``load+prepare``: the same from the file path (NIfTI decode included);
  the first (cold) call, which includes imports, is reported separately.
- peer: MONAI ``Orientation("RPI") + Spacing((1, 1, 4)) + ScaleIntensityRange`` per
  window (percentiles for MRI), no crop/mask, same process, same input.
- ``cached load``: :meth:`CacheManager.load_image` of one window (what
  :class:`ImageDataset` reads per item) and of all channels, float32 out; peers: the same
  arrays stored as float32 ``.npy`` and as compressed uint8 ``.npz``.
- ``dataset item``: :class:`ImageDataset.__getitem__` from the cache, tokenised.
- size ratio: cache bytes (uint8 ``.pt`` channels + mask) / the same arrays as float32.

Usage: ``.venv/bin/python benchmarks/data_pipeline.py [--repeats N] [--json OUT]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parent.parent / "tests" / "data_pipeline" / "data"
CT_FILE = DATA / "ct_head_1mm_air.nii.gz"
MRI_FILE = DATA / "mni152_t1_1mm.nii.gz"


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _monai_peer(volume: Any, mode: str) -> Callable[[], Any]:
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, ScaleIntensityRange, ScaleIntensityRangePercentiles
    from monai.transforms import Spacing as MonaiSpacing

    from medinfer.data import CT_WINDOWS

    img = MetaTensor(
        torch.from_numpy(volume.array.astype(np.float32)), affine=torch.from_numpy(volume.affine)
    )
    orient = Orientation(axcodes="RPI")
    spacing = MonaiSpacing(pixdim=(1.0, 1.0, 4.0), mode="bilinear")
    if mode == "ct":
        scalers = [
            ScaleIntensityRange(lev - w / 2, lev + w / 2, 0.0, 1.0, clip=True)
            for w, lev in CT_WINDOWS.values()
        ]
    else:
        scalers = [ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)]

    def run() -> Any:
        x = spacing(orient(img))
        return [s(x) for s in scalers]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    args = parser.parse_args()

    t0 = time.perf_counter()
    from medinfer.data import (
        CacheManager,
        DatasetMetadata,
        ImageDataset,
        load_image,
        prepare_for_inference,
    )
    from medinfer.transforms import resample_to_spacing

    t_import = time.perf_counter() - t0
    ct = load_image(CT_FILE)
    mri = load_image(MRI_FILE)
    big_ct = resample_to_spacing(ct, (0.5, 0.5, 1.0)).with_array(
        np.rint(resample_to_spacing(ct, (0.5, 0.5, 1.0)).array).astype(np.int16)
    )
    cases = [("CT 202x202x179", ct, CT_FILE, "ct"), ("MRI 197x233x189", mri, MRI_FILE, "mri")]
    rows: list[dict[str, Any]] = []
    for name, vol, path, mode in cases:
        t0 = time.perf_counter()
        out = prepare_for_inference(vol, mode)
        cold = time.perf_counter() - t0
        assert out is not None
        rows.append(
            {
                "image": name,
                "mode": mode,
                "prepared": "x".join(str(s) for s in out.img_arrs[0].shape[1:]),
                "tokens": int(out.mask.numel()),
                "foreground_tokens": int((out.mask == 0).sum()),
                "cold_s": cold,
                "prepare_s": _median_time(
                    lambda v=vol, m=mode: prepare_for_inference(v, m), args.repeats
                ),
                "load_prepare_s": _median_time(
                    lambda p=path, m=mode: prepare_for_inference(p, m), args.repeats
                ),
                "monai_s": _median_time(_monai_peer(vol, mode), args.repeats),
            }
        )
    big = {
        "image": "CT 404x404x179 (0.5 mm, derived)",
        "prepare_s": _median_time(lambda: prepare_for_inference(big_ct, "ct"), 3),
        "monai_s": _median_time(_monai_peer(big_ct, "ct"), 3),
    }

    tmp = Path(tempfile.mkdtemp(prefix="medinfer-bench-"))
    try:
        for study, src in (("ct", CT_FILE), ("mri", MRI_FILE)):
            (tmp / "raw" / study).mkdir(parents=True)
            shutil.copyfile(src, tmp / "raw" / study / src.name)
        DatasetMetadata.from_directory(tmp, {"ct": "ct", "mri": "mri"}).save(tmp)
        cm = CacheManager(tmp)
        t0 = time.perf_counter()
        report = cm.build_cache(num_workers=2)
        build_s = time.perf_counter() - t0
        assert report.built == 2, report
        stats = cm.get_cache_stats()
        ds = ImageDataset(tmp, ct_window_probs={"brain": 1.0})
        for row, (study, src) in zip(rows, (("ct", CT_FILE), ("mri", MRI_FILE)), strict=True):
            window = "brain" if study == "ct" else "mri"
            full = cm.load_image(study, src.name)
            f32 = tmp / f"{study}_float32.npy"
            np.save(f32, full)
            npz = tmp / f"{study}_uint8.npz"
            np.savez_compressed(npz, data=np.rint(full * 255).astype(np.uint8))
            meta = cm.entry_meta(study, src.name)
            cache_bytes = sum(int(v) for v in meta["files"].values())
            mask = cm.load_mask(study, src.name)
            f32_bytes = full.size * 4 + mask.size * 4 + 128 * (full.shape[0] + 1)
            index = ds.study_ids.index(study)
            row.update(
                cached_window_s=_median_time(
                    lambda s=study, n=src.name, w=window: cm.load_image(s, n, w), 5 * args.repeats
                ),
                cached_all_s=_median_time(
                    lambda s=study, n=src.name: cm.load_image(s, n), 5 * args.repeats
                ),
                float32_npy_s=_median_time(lambda p=f32: np.load(p), 5 * args.repeats),
                uint8_npz_s=_median_time(
                    lambda p=npz: np.load(p)["data"].astype(np.float32) / 255, args.repeats
                ),
                dataset_item_s=_median_time(lambda i=index: ds[i], 5 * args.repeats),
                cache_bytes=cache_bytes,
                float32_bytes=f32_bytes,
                size_ratio=cache_bytes / f32_bytes,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"medinfer.data benchmark (median of {args.repeats} runs after warm-up; "
        f"import of medinfer.data {t_import:.2f} s)\n"
    )
    print(
        "| image | prepared (D x H x W) | tokens (fg) | prepare (s) | load+prepare (s) "
        "| first call (s) | MONAI peer (s) | cached load, 1 window (ms) "
        "| cached load, all (ms) | float32 .npy (ms) | uint8 .npz (ms) | dataset item (ms) "
        "| cache MB | float32 MB | size ratio |"
    )
    print("|" + "---|" * 15)
    for r in rows:
        print(
            f"| {r['image']} | {r['prepared']} | {r['tokens']} ({r['foreground_tokens']}) "
            f"| {r['prepare_s']:.3f} | {r['load_prepare_s']:.3f} | {r['cold_s']:.3f} "
            f"| {r['monai_s']:.3f} | {1e3 * r['cached_window_s']:.2f} "
            f"| {1e3 * r['cached_all_s']:.2f} | {1e3 * r['float32_npy_s']:.2f} "
            f"| {1e3 * r['uint8_npz_s']:.2f} | {1e3 * r['dataset_item_s']:.2f} "
            f"| {r['cache_bytes'] / 1e6:.2f} | {r['float32_bytes'] / 1e6:.2f} "
            f"| {r['size_ratio']:.3f} |"
        )
    print(f"\n{big['image']}: prepare {big['prepare_s']:.3f} s, MONAI peer {big['monai_s']:.3f} s")
    print(
        f"cache build of both images with 2 worker processes: {build_s:.2f} s "
        f"(includes process start-up); whole-cache size ratio vs float32 "
        f"{stats['size_ratio']:.3f}"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "big": big, "build_s": build_s, "stats": stats}, indent=1)
        )


if __name__ == "__main__":
    main()
