"""A batch run killed with SIGKILL mid-run resumes with --continue: no partial outputs,
every case done exactly once in the final manifest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from batch_helpers import final_files, manifest, write_nifti

from medinfer.cli import main

N = 8


def _complete(out: Path) -> None:
    """Every final (non-hidden) file is whole: label maps decode, JSON parses."""
    for name in final_files(out):
        p = out / name
        if name.endswith(".nii.gz"):
            assert np.asarray(nib.load(str(p)).dataobj).shape == (14, 12, 6)
        elif name.endswith(".json"):
            json.loads(p.read_text())


def test_sigkill_then_continue(tmp_path: Path, model_dir: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(N):
        write_nifti(folder / f"k{i:02d}.nii.gz", i)
    out = tmp_path / "out"
    args = ["predict", str(folder), "-m", str(model_dir), "-o", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from medinfer.cli import main; main()",
                             *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and \
                not list(out.glob("*_stats.json")):
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode in (-signal.SIGKILL, 0)  # killed (or already done), not failed
    _complete(out)

    with pytest.raises(SystemExit) as info:
        main([*args, "--continue"])
    assert info.value.code in (0, None)
    run = manifest(out)
    ids = [c["id"] for c in run["cases"]]
    assert sorted(ids) == [f"k{i:02d}" for i in range(N)]  # each case exactly once
    assert {c["status"] for c in run["cases"]} <= {"ok", "skipped"}
    assert run["counts"]["ok"] + run["counts"]["skipped"] == N and run["finished"]
    assert not [n for n in os.listdir(out) if ".part" in n]  # no temporaries left
    _complete(out)
    for c in run["cases"]:
        assert all((out / n).is_file() for n in c["outputs"])
