"""``medinfer-nnUNetv2_predict`` / ``medinfer nnunet predict``: nnU-Net's command line,
same files as ``nnUNetv2_predict`` with the same flags (the oracle of :mod:`nnunet_oracle`).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nnunet_oracle import (
    CLI_CASES,
    CLI_SEED,
    DATASET_ID,
    build_model,
    oracle_env,
    write_cases,
)
from nnunet_oracle import _run as run_oracle
from nnunet_oracle import _tool as oracle_tool

pytestmark = pytest.mark.timeout(2400)

SCRIPT = str(Path(sys.executable).parent / "medinfer-nnUNetv2_predict")
CASES = sorted(CLI_CASES)


@pytest.fixture(scope="module")
def results() -> Path:
    return build_model().parents[1]  # $nnUNet_results


@pytest.fixture(scope="module")
def in_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = write_cases(tmp_path_factory.mktemp("cli_in"), CLI_CASES, CLI_SEED)
    (d / "notes.txt").write_text("ignored, as nnU-Net ignores it")
    return d


FLAGS = ["-d", str(DATASET_ID), "-c", "3d_fullres", "-tr", "nnUNetTrainer_1epoch", "-f", "0",
         "--save_probabilities", "--disable_tta", "-npp", "1", "-nps", "1", "-device", "cpu"]


@pytest.fixture(scope="module")
def reference(results: Path, in_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli_ref")
    run_oracle([oracle_tool("nnUNetv2_predict"), "-i", str(in_dir), "-o", str(out), *FLAGS],
               oracle_env(results.parent))
    return out


def _ours(results: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "nnUNet_results": str(results), "OMP_NUM_THREADS": "1"}
    return subprocess.run([SCRIPT, *args], env=env, capture_output=True, text=True,
                          timeout=900)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * float(np.sum(a & b)) / s


def test_same_files_as_nnunetv2_predict_in_two_parts(results: Path, in_dir: Path,
                                                       reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r0 = _ours(results, ["-i", str(in_dir), "-o", str(out), *FLAGS,
                         "-num_parts", "2", "-part_id", "0"])
    assert r0.returncode == 0, r0.stderr
    # part 0 of 2: cases 0 and 2 of the sorted case ids, as nnU-Net splits them
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["case_a.nii.gz", "case_c.nii.gz"]
    r1 = _ours(results, ["-i", str(in_dir), "-o", str(out), *FLAGS,
                         "-num_parts", "2", "-part_id", "1"])
    assert r1.returncode == 0, r1.stderr
    ref_files = {p.name for p in reference.iterdir()} - {"predict_from_raw_data_args.json"}
    assert ref_files <= {p.name for p in out.iterdir()}, ref_files
    for case in CASES:
        ref_img = nib.load(str(reference / f"{case}.nii.gz"))
        our_img = nib.load(str(out / f"{case}.nii.gz"))
        ref = np.asarray(ref_img.dataobj).astype(np.int64)
        lab = np.asarray(our_img.dataobj).astype(np.int64)
        src = nib.load(str(in_dir / f"{case}_0000.nii.gz"))
        assert lab.shape == ref.shape == src.shape
        np.testing.assert_allclose(our_img.affine, src.affine, atol=1e-4)
        for v in (1, 2):
            assert np.any(ref == v), f"{case}: oracle predicts no label {v}"
            d = _dice(lab == v, ref == v)
            print(f"{case} label {v}: Dice {d:.5f}")
            assert d >= 0.99, (case, v, d)
        ours_p = np.load(out / f"{case}.npz")["probabilities"]
        ref_p = np.load(reference / f"{case}.npz")["probabilities"]
        assert ours_p.shape == ref_p.shape
        # nnU-Net accumulates the windows' logits in float16, medinfer in float32 on CPU:
        # differences of float16 size almost everywhere, larger at a few boundary voxels
        diff = np.abs(ours_p.astype(np.float64) - ref_p)
        p999 = float(np.percentile(diff, 99.9))
        print(f"{case}: |p - p_ref| mean {diff.mean():.1e}, 99.9th pct {p999:.1e}, "
              f"max {diff.max():.1e}; > 0.01 at {int((diff > 0.01).sum())} of {diff.size}")
        assert diff.mean() <= 1e-4 and p999 <= 2e-3, (case, float(diff.mean()), p999)
        assert (diff > 0.01).sum() <= 1e-3 * diff.size, case
        props = pickle.loads((out / f"{case}.pkl").read_bytes())
        ref_props = pickle.loads((reference / f"{case}.pkl").read_bytes())
        np.testing.assert_allclose(props["spacing"], ref_props["spacing"], rtol=1e-5)
        assert list(props["shape_before_cropping"]) == list(ref_props["shape_before_cropping"])
        np.testing.assert_allclose(props["sitk_stuff"]["origin"],
                                   ref_props["sitk_stuff"]["origin"], atol=1e-3)
        np.testing.assert_allclose(props["sitk_stuff"]["direction"],
                                   ref_props["sitk_stuff"]["direction"], atol=1e-5)

    # --continue_prediction: finished cases are skipped, a missing one is redone
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("case_*")}
    (out / "case_b.nii.gz").unlink()
    r2 = _ours(results, ["-i", str(in_dir), "-o", str(out), *FLAGS, "--continue_prediction"])
    assert r2.returncode == 0, r2.stderr
    assert (out / "case_b.nii.gz").is_file()
    for name in ("case_a.nii.gz", "case_a.npz", "case_c.nii.gz", "case_c.npz"):
        assert (out / name).stat().st_mtime_ns == stamps[name], name


def test_medinfer_nnunet_predict_and_bad_input(results: Path, in_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from medinfer.cli import main

    monkeypatch.setenv("nnUNet_results", str(results))
    single = tmp_path / "in"
    single.mkdir()
    for c in range(2):
        (single / f"case_b_{c:04d}.nii.gz").write_bytes(
            (in_dir / f"case_b_{c:04d}.nii.gz").read_bytes())
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as ok:
        main(["nnunet", "predict", "-i", str(single), "-o", str(out), "-d",
              f"Dataset{DATASET_ID}_Blob", "-c", "3d_fullres", "-tr", "nnUNetTrainer_1epoch",
              "-f", "0", "--disable_tta", "-device", "cpu"])
    assert not ok.value.code, capsys.readouterr().err
    assert (out / "case_b.nii.gz").is_file() and (out / "dataset.json").is_file()
    assert not (out / "case_b.npz").exists()

    def fails(argv: list[str], match: str) -> None:
        with pytest.raises(SystemExit) as exc:
            main(["nnunet", "predict", *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err and err.count("\n") == 1, err

    base = ["-i", str(single), "-o", str(tmp_path / "o2"), "-c", "3d_fullres",
            "-tr", "nnUNetTrainer_1epoch", "-f", "0"]
    fails([*base, "-d", "991"], "not found")
    fails([*base, "-d", "990", "-f", "3"], "fold '3'")
    fails([*base, "-d", "990", "-chk", "model.pth"], "-chk")
    fails([*base, "-d", "990", "--no_such_flag"], "unrecognized arguments")
    fails([*base, "-d", "990", "-num_parts", "2", "-part_id", "2"], "-part_id")
    fails(["-i", str(single), "-o", str(tmp_path / "o3")], "cannot tell the nnU-Net version")
    (single / "case_x_0000.nii.gz").write_bytes((single / "case_b_0000.nii.gz").read_bytes())
    fails([*base, "-d", "990"], "case 'case_x' has no file for channel(s) 0001")


def test_v1_model_lookup_and_bad_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from medinfer.formats.nnunet_cli import find_v1_model, run

    folder = (tmp_path / "nnUNet" / "3d_fullres" / "Task029_LiTS"
              / "nnUNetTrainerV2__nnUNetPlansv2.1")
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.pkl").write_bytes(pickle.dumps({"num_stages": 1}))
    (folder / "fold_0" / "model_final_checkpoint.model").write_bytes(b"not a checkpoint")
    monkeypatch.setenv("RESULTS_FOLDER", str(tmp_path))
    assert find_v1_model("29", "nnUNetTrainerV2", "nnUNetPlansv2.1", "3d_fullres") == folder
    assert find_v1_model("Task029_LiTS", "nnUNetTrainerV2", "nnUNetPlansv2.1",
                         "3d_fullres") == folder
    code = run(["-i", str(tmp_path), "-o", str(tmp_path / "o"), "-t", "Task029_LiTS",
                "-tr", "nnUNetTrainerV2", "-p", "nnUNetPlansv2.1", "-m", "3d_fullres"], "v1")
    assert code == 2
    err = capsys.readouterr().err
    assert "model_final_checkpoint.model" in err and err.count("\n") == 1, err
    code = run(["-i", str(tmp_path), "-o", str(tmp_path / "o"), "-t", "30"], "v1")
    assert code == 2
    assert "-t '30': not found" in capsys.readouterr().err
