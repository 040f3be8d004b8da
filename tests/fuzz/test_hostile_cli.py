"""Issue 18.9, CLI: an existing file as ``-o`` and very long names give exit 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fuzz_corpus import nifti_bytes

from medinfer._atomic import write_bytes_atomic


def test_18_9_output_that_is_a_file_exits_2_before_work(tmp_path: Path) -> None:
    scan = tmp_path / "s.nii"
    scan.write_bytes(nifti_bytes())
    taken = tmp_path / "out"
    taken.write_text("not a folder\n")
    r = subprocess.run([sys.executable, "-m", "medinfer.cli", "predict", str(scan), "-o",
                        str(taken), "--device", "cpu"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "exists and is not a folder" in r.stderr
    assert taken.read_text() == "not a folder\n"


def test_18_9_long_names_keep_temporary_names_short(tmp_path: Path) -> None:
    name = "c" * 230 + "_label.nii.gz"  # 243 characters: the temporary name must fit too
    out = write_bytes_atomic(tmp_path / name, b"data")
    assert out.read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_18_13_case_files_land_together_or_none(tmp_path: Path) -> None:
    import pytest

    from medinfer._atomic import atomic_paths

    (tmp_path / "case_stats.json").mkdir()  # the stats name is taken by a folder
    names = {"seg": "case_seg.nii.gz", "prob": "case_prob.nii.gz",
             "overlay": "case_overlay.png", "stats": "case_stats.json"}
    with pytest.raises(IsADirectoryError), atomic_paths(
            {k: tmp_path / v for k, v in names.items()}) as tmp:
        for p in tmp.values():
            p.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_stats.json"]
    # and when every name is free, all of them land
    (tmp_path / "case_stats.json").rmdir()
    with atomic_paths({k: tmp_path / v for k, v in names.items()}) as tmp:
        for k, p in tmp.items():
            p.write_text(k)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names.values())
    assert (tmp_path / "case_stats.json").read_text() == "stats"


_FULL_DISK = """
set -e
mount -t tmpfs -o size=16k,mode=0755 medinfer-full "$1"
if head -c 1000000 /dev/zero > "$1/filler" 2>/dev/null; then echo not-full; fi
set +e
"$2" -m medinfer.cli predict "$3" -o "$1" --device cpu 2> "$4"
echo "rc=$?"
ls -A "$1"
"""


def test_18_9_full_disk_exits_2_with_one_line_and_no_partial_files(tmp_path: Path) -> None:
    """A real ENOSPC: ``-o`` is a 16 KiB tmpfs filled up before the run.

    The tmpfs is mounted in a private user + mount namespace (``unshare -Urm``, no root
    mount on the host; it vanishes with the process), so the listing of the output
    folder after the run is taken inside that namespace.
    """
    scan = tmp_path / "s.nii"
    scan.write_bytes(nifti_bytes())
    full = tmp_path / "full"
    full.mkdir()
    err = tmp_path / "stderr.txt"
    r = subprocess.run(["unshare", "-Urm", "sh", "-c", _FULL_DISK, "full-disk", str(full),
                        sys.executable, str(scan), str(err)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)  # the mount worked
    lines = r.stdout.split()
    assert "not-full" not in lines
    stderr = err.read_text()
    assert lines[0] == "rc=2", (lines, stderr[-2000:])
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert "No space left on device" in stderr and "s.nii" in stderr, stderr
    assert lines[1:] == ["filler"]  # no partial output, no temporary left behind
    assert sorted(p.name for p in full.iterdir()) == []  # nothing reached the host folder
