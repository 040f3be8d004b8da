"""Benchmark: DICOM SEG writing, medinfer (highdicom) vs dcmqi ``itkimage2segimage``.

Builds a single-frame CT series (default 512 x 512 x 300, int16, oblique, shuffled file
order) and label maps with 5 and with 104 labels (boxes of various sizes over different
slice ranges, like a whole-body organ map), then writes a BINARY DICOM SEG of each label
map with

- ``medinfer``: :func:`medinfer.io.dicom_seg.write_dicom_seg` (headers of the source
  series read inside the timed call);
- ``dcmqi``: ``itkimage2segimage --inputImageList label.nii.gz --inputDICOMDirectory
  series --inputMetadata meta.json --outputDICOM out.dcm`` (PyPI ``dcmqi``), with the same
  segment names, colours and codes.

Each writer runs in its own child process (``--worker``); wall time and the child's peak
resident memory (``VmHWM`` of ``/proc/<pid>/status``, sampled every 20 ms; the high-water
mark is monotonic, so only growth in the last 20 ms can be missed) are measured from
outside, so both
include interpreter start-up and imports (dcmqi is a C++ binary; medinfer's child also
imports Python, numpy, pydicom, highdicom and reads the label NIfTI); the table also gives
medinfer's in-process time of the ``write_dicom_seg`` call alone. Both SEGs are read
back with highdicom and compared with the label map (they must agree voxel for voxel).

Usage::

    .venv/bin/python benchmarks/dicom_out.py [--shape 512 512 300] [--labels 5 104]
        [--repeats 1]

Prints a Markdown table (time s, peak MiB, ratios dcmqi / medinfer). Numbers depend on the
machine and its load; compare the rows of one table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CARD_BASE: dict[str, Any] = {
    "name": "bench-seg", "version": "1.0",
    "input": {"orientation": "RAS", "spacing": [1.0, 1.0, 1.0],
              "normalization": {"method": "zscore"}},
    "inference": {"patch_size": [8, 8, 8], "overlap": 0.25},
    "weights": {"format": "state_dict", "file": "model.pt"},
    "architecture": {"network": "UNet", "kwargs": {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
        "strides": [2], "num_res_units": 0}},
}


def _colour(v: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(v)
    return [int(c) for c in rng.integers(30, 255, size=3)]


def make_labels(shape: tuple[int, int, int], n: int) -> Any:
    """``n`` boxes on a grid over (I, J), each over its own slice range (uint8)."""
    import numpy as np

    lab = np.zeros(shape, np.uint8)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    ci, cj = shape[0] // cols, shape[1] // rows
    rng = np.random.default_rng(0)
    for v in range(1, n + 1):
        a, b = divmod(v - 1, cols)
        i0, j0 = b * ci + 2, a * cj + 2
        k0 = int(rng.integers(0, shape[2] * 2 // 3))
        k1 = min(shape[2], k0 + int(rng.integers(shape[2] // 10, shape[2] // 3 + 2)))
        lab[i0:i0 + max(ci - 4, 1), j0:j0 + max(cj - 4, 1), k0:k1] = v
    return lab


def build(work: Path, shape: tuple[int, int, int], label_counts: list[int]) -> None:
    """Series, label NIfTIs, card and dcmqi metadata into ``work``."""
    import nibabel as nib
    import numpy as np
    import yaml
    from scipy.spatial.transform import Rotation

    from medinfer.io import read_dicom
    from medinfer.io.dicom_writer import write_dicom_series
    from medinfer.volume import Volume

    aff = np.eye(4)
    rot = Rotation.from_euler("xyz", (6, -4, 9), degrees=True).as_matrix()
    aff[:3, :3] = rot @ np.diag([-0.8, -0.8, 1.5])
    aff[:3, 3] = (180.0, 150.0, -200.0)
    rng = np.random.default_rng(1)
    arr = rng.integers(-100, 200, size=shape, dtype=np.int16)
    write_dicom_series(Volume(arr, aff), work / "series", modality="CT", shuffle_seed=2)
    src = read_dicom(work / "series")
    for n in label_counts:
        lab = make_labels(src.spatial_shape, n)
        nib.save(nib.Nifti1Image(lab, src.affine), str(work / f"labels_{n}.nii.gz"))
        card = dict(CARD_BASE, labels={0: {"name": "background", "color": [0, 0, 0]},
                                       **{v: {"name": f"structure {v}", "color": _colour(v)}
                                          for v in range(1, n + 1)}})
        (work / f"card_{n}").mkdir(exist_ok=True)
        (work / f"card_{n}" / "model.yaml").write_text(yaml.safe_dump(card))
        meta = {
            "ContentCreatorName": "bench", "ClinicalTrialSeriesID": "1",
            "ClinicalTrialTimePointID": "1", "SeriesDescription": "SEG dcmqi",
            "SeriesNumber": "300", "InstanceNumber": "1", "BodyPartExamined": "",
            "segmentAttributes": [[{
                "labelID": v, "SegmentDescription": f"structure {v}",
                "SegmentLabel": f"structure {v}", "SegmentAlgorithmType": "AUTOMATIC",
                "SegmentAlgorithmName": "bench-seg",
                "SegmentedPropertyCategoryCodeSequence": {
                    "CodeValue": "85756007", "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Tissue"},
                "SegmentedPropertyTypeCodeSequence": {
                    "CodeValue": "85756007", "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Tissue"},
                "recommendedDisplayRGBValue": _colour(v)} for v in range(1, n + 1)]],
            "ContentLabel": "SEGMENTATION", "ContentDescription": "dcmqi",
        }
        (work / f"meta_{n}.json").write_text(json.dumps(meta))


def worker(work: Path, n: int) -> None:
    """Write one SEG with medinfer (runs in a child process)."""
    from medinfer.io import load
    from medinfer.io.dicom_seg import write_dicom_seg
    from medinfer.models.card import ModelCard

    card = ModelCard.from_yaml(work / f"card_{n}" / "model.yaml")
    label = load(work / f"labels_{n}.nii.gz")
    t0 = time.perf_counter()
    write_dicom_seg(label, work / "series", card, work / f"medinfer_{n}.dcm")
    sys.stdout.write(json.dumps({"write_s": time.perf_counter() - t0}) + "\n")


def _dcmqi_binary(name: str) -> str:
    """The dcmqi executable itself (the PyPI package's console script is a Python wrapper
    that would add its start-up time)."""
    try:
        import dcmqi

        exe = Path(dcmqi.__file__).parent / "bin" / name
        if exe.is_file():
            return str(exe)
    except ImportError:
        pass
    return shutil.which(name) or str(Path(sys.executable).parent / name)


def measure(kind: str, work: Path, n: int) -> tuple[float, float, float]:
    """(wall s, peak RSS MiB, in-process write s) of one child process (dcmqi: the write
    time is the wall time)."""
    if kind == "dcmqi":
        cmd = [_dcmqi_binary("itkimage2segimage"),
               "--inputImageList", str(work / f"labels_{n}.nii.gz"),
               "--inputDICOMDirectory", str(work / "series"), "--inputMetadata",
               str(work / f"meta_{n}.json"), "--outputDICOM", str(work / f"dcmqi_{n}.dcm")]
    else:
        cmd = [sys.executable, __file__, "--worker", "--work", str(work), "--n", str(n)]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f)
        peak_kib = 0
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            peak_kib = max(peak_kib, _vm_hwm_kib(status))
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read().decode(), err_f.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed ({proc.returncode}): {err[-2000:]}")
    write = json.loads(out.splitlines()[-1])["write_s"] if kind == "medinfer" else wall
    return wall, peak_kib / 1024.0, write


def _vm_hwm_kib(status: Path) -> int:
    """Peak resident set (VmHWM, KiB) of a running process, 0 when it is gone."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def check(work: Path, n: int) -> tuple[bool, bool]:
    """Do both SEGs give the label map back (highdicom, on the source grid)?"""
    import numpy as np

    from medinfer.io import load
    from medinfer.io.dicom_seg import read_dicom_seg

    lab = np.asarray(load(work / f"labels_{n}.nii.gz").array[0])
    src = load(work / "series")
    ours = read_dicom_seg(work / f"medinfer_{n}.dcm", reference=src).array[0]
    peer = read_dicom_seg(work / f"dcmqi_{n}.dcm", reference=src).array[0]
    return bool(np.array_equal(ours, lab)), bool(np.array_equal(peer, lab))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    ap.add_argument("--labels", type=int, nargs="+", default=[5, 104])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--n", type=int)
    args = ap.parse_args()
    if args.worker:
        worker(args.work, args.n)
        return
    if args.build:
        build(args.work, tuple(args.shape), args.labels)
        return
    if args.check:
        sys.stdout.write(json.dumps(check(args.work, args.n)) + "\n")
        return
    work = Path(tempfile.mkdtemp(prefix="medinfer-dicom-out-"))
    try:
        t0 = time.perf_counter()
        # the measuring process stays small (a child's peak memory must not include it)
        subprocess.run([sys.executable, __file__, "--build", "--work", str(work), "--shape",
                        *map(str, args.shape), "--labels", *map(str, args.labels)],
                       check=True)
        sys.stderr.write(f"built series and labels in {time.perf_counter() - t0:.1f} s\n")
        rows = []
        for n in args.labels:
            res: dict[str, tuple[float, float, float]] = {}
            for kind in ("medinfer", "dcmqi"):
                runs = [measure(kind, work, n) for _ in range(args.repeats)]
                res[kind] = (min(r[0] for r in runs), max(r[1] for r in runs),
                             min(r[2] for r in runs))
            ok_ours, ok_peer = json.loads(subprocess.run(
                [sys.executable, __file__, "--check", "--work", str(work), "--n", str(n)],
                check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            rows.append((n, res, ok_ours, ok_peer))
        shape = "x".join(map(str, args.shape))
        print(f"| series {shape} | labels | medinfer process s | medinfer write s | dcmqi s | "
              "time dcmqi/medinfer (process) | medinfer peak MiB | dcmqi peak MiB | "
              "memory dcmqi/medinfer | equal (ours, dcmqi) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for n, res, ok_ours, ok_peer in rows:
            (tm, mm, wm), (td, md, _) = res["medinfer"], res["dcmqi"]
            print(f"| | {n} | {tm:.1f} | {wm:.1f} | {td:.1f} | {td / tm:.2f} | {mm:.0f} | "
                  f"{md:.0f} | {md / mm:.2f} | {ok_ours}, {ok_peer} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
