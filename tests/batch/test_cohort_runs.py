"""Cohort runs: keep going, stable case ids, never overwrite, --continue, sharding, workers."""

from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from batch_helpers import final_files, manifest, write_dicom, write_nifti

from medinfer.cli import main


def _run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0)


def _predict(inputs: list[Path], model: Path, out: Path, *extra: str) -> int:
    return _run(["predict", *map(str, inputs), "-m", str(model), "-o", str(out),
                 "--device", "cpu", *extra])


def _cohort(root: Path) -> list[Path]:
    """12 cases: 8 NIfTI, 2 corrupt NIfTI, 2 DICOM series named 'AX T1' of 2 patients."""
    root.mkdir()
    nifti = root / "nifti"
    nifti.mkdir()
    for i in range(8):
        write_nifti(nifti / f"case{i:02d}.nii.gz", i)
    (nifti / "corrupt_text.nii.gz").write_text("not an image\n")
    good = gzip.compress((nifti / "case00.nii.gz").read_bytes())
    (nifti / "corrupt_truncated.nii.gz").write_bytes(good[: len(good) // 3])
    a = write_dicom(root / "patA", 20, patient_id="PAT-A")
    b = write_dicom(root / "patB", 21, patient_id="PAT-B")
    return [nifti, a, b]


def test_twelve_cases_keep_going_continue_and_redo(tmp_path: Path, model_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    inputs = _cohort(tmp_path / "in")
    out = tmp_path / "out"
    assert _predict(inputs, model_dir, out) == 3
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "corrupt_text" in captured.err and "corrupt_truncated" in captured.err
    run = manifest(out)
    cases = {c["id"]: c for c in run["cases"]}
    assert len(cases) == 12 and run["counts"] == {"ok": 10, "skipped": 0, "failed": 2,
                                                   "total": 12}
    failed = {k for k, c in cases.items() if c["status"] == "failed"}
    assert failed == {"corrupt_text", "corrupt_truncated"}
    assert all(cases[k]["error"] for k in failed)
    # the two 'AX T1' series get distinct ids that name their patient
    dicom_ids = sorted(k for k in cases if k.startswith("PAT-"))
    assert len(dicom_ids) == 2 and dicom_ids[0].startswith("PAT-A_") and \
        dicom_ids[1].startswith("PAT-B_")
    for k in dicom_ids:
        stats = json.loads((out / f"{k}_stats.json").read_text())
        assert stats["source"]["patient_id"] == k.split("_")[0]
        assert stats["case_id"] == k and stats["model_hash"] == run["model"]["hash"]
    ok = [k for k, c in cases.items() if c["status"] == "ok"]
    for k in ok:  # every output listed exists, written once
        assert cases[k]["outputs"] and all((out / n).is_file() for n in cases[k]["outputs"])
        assert cases[k]["model_hash"].startswith("sha256:")
    with open(out / "cases.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["id"] for r in rows) == sorted(cases)
    assert "corrupt" not in "".join(final_files(out)).replace("corrupt", "", 0) or True
    assert not any(n.startswith("corrupt") for n in final_files(out))
    mtimes = {n: (out / n).stat().st_mtime_ns for n in final_files(out) if "_" in n}

    # --continue: nothing left to do but the two corrupt cases, which fail again
    assert _predict(inputs, model_dir, out, "--continue") == 3
    run2 = manifest(out)
    assert run2["counts"] == {"ok": 0, "skipped": 10, "failed": 2, "total": 12}
    assert {n: (out / n).stat().st_mtime_ns for n in mtimes} == mtimes

    # without the corrupt inputs: processes nothing, exit 0
    good_inputs = [*sorted((inputs[0]).glob("case*.nii.gz")), inputs[1], inputs[2]]
    assert _predict(good_inputs, model_dir, out, "--continue") == 0
    assert manifest(out)["counts"] == {"ok": 0, "skipped": 10, "failed": 0, "total": 10}

    # delete one output: exactly that case is redone
    (out / "case03_seg.nii.gz").unlink()
    assert _predict(good_inputs, model_dir, out, "--continue") == 0
    run4 = manifest(out)
    assert [c["id"] for c in run4["cases"] if c["status"] == "ok"] == ["case03"]
    assert run4["counts"]["skipped"] == 9
    assert (out / "case03_seg.nii.gz").is_file()
    assert {n: (out / n).stat().st_mtime_ns for n in mtimes if not n.startswith("case03")} \
        == {n: t for n, t in mtimes.items() if not n.startswith("case03")}


def test_existing_outputs_are_kept_unless_overwrite(tmp_path: Path, model_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    scan = write_nifti(tmp_path / "head.nii.gz", 1)
    out = tmp_path / "out"
    assert _predict([scan], model_dir, out) == 0
    before = (out / "head_seg.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert _predict([scan], model_dir, out) == 2  # a single case: its error, exit 2
    err = capsys.readouterr().err
    assert "head_stats.json" in err and "--overwrite" in err and err.count("\n") == 1
    assert (out / "head_seg.nii.gz").stat().st_mtime_ns == before
    assert _predict([scan], model_dir, out, "--overwrite") == 0
    assert (out / "head_seg.nii.gz").stat().st_mtime_ns != before
    assert _predict([scan], model_dir, out, "--overwrite", "--continue") == 2
    # other settings: --continue does not pass the old outputs off as done
    assert _predict([scan], model_dir, out, "--continue", "--save-probabilities") == 2
    assert "other settings" in capsys.readouterr().err
    # a label map without its stats file (no record of its source) is kept too
    (out / "head_stats.json").unlink()
    assert _predict([scan], model_dir, out) == 2
    assert "head_seg.nii.gz" in capsys.readouterr().err


def test_same_description_of_two_patients_across_runs(tmp_path: Path, model_dir: Path) -> None:
    """Issue 17.5: 'AX T1' of patient B never replaces patient A's outputs (any --name-by)."""
    a = write_dicom(tmp_path / "a", 30, patient_id="PAT-A")
    b = write_dicom(tmp_path / "b", 31, patient_id="PAT-B")
    out = tmp_path / "out"
    assert _predict([a], model_dir, out, "--name-by", "description") == 0
    seg_a = (out / "AX_T1_seg.nii.gz").read_bytes()
    assert _predict([b], model_dir, out, "--name-by", "description") == 0
    assert (out / "AX_T1_seg.nii.gz").read_bytes() == seg_a
    stats_a = json.loads((out / "AX_T1_stats.json").read_text())
    assert stats_a["source"]["patient_id"] == "PAT-A"
    other = [p for p in out.glob("AX_T1-*_stats.json")]
    assert len(other) == 1
    assert json.loads(other[0].read_text())["source"]["patient_id"] == "PAT-B"
    # in one run, in either order, the names do not depend on the order
    for order, folder in (([a, b], "o1"), ([b, a], "o2")):
        assert _predict(order, model_dir, tmp_path / folder, "--name-by", "description") == 0
    assert final_files(tmp_path / "o1") == final_files(tmp_path / "o2")
    assert "AX_T1_seg.nii.gz" not in final_files(tmp_path / "o1")


def test_unexpected_exception_is_a_clean_per_case_error(
        tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 17.10: a crash inside one case fails that case only; the others are intact."""
    import medinfer.batch as mb

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        write_nifti(folder / f"s{i}.nii.gz", i)
    real = mb.CaseProcessor.infer

    def crashing(self: Any, spec: Any, *args: Any, **kwargs: Any) -> Any:
        if spec.case_id == "s1":
            raise IndexError("index 63 is out of bounds for axis 0 with size 62")
        return real(self, spec, *args, **kwargs)

    monkeypatch.setattr(mb.CaseProcessor, "infer", crashing)
    out = tmp_path / "out"
    assert _predict([folder], model_dir, out) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and "IndexError: index 63" in err
    cases = {c["id"]: c for c in manifest(out)["cases"]}
    assert cases["s1"]["status"] == "failed" and "IndexError" in cases["s1"]["error"]
    assert {cases["s0"]["status"], cases["s2"]["status"]} == {"ok"}
    for k in ("s0", "s2"):
        assert nib.load(str(out / f"{k}_seg.nii.gz")).shape == (14, 12, 6)
    assert not any(n.startswith("s1_") for n in final_files(out))
    # one case alone: exit 2, one line on stderr, nothing written
    out1 = tmp_path / "out1"
    assert _predict([folder / "s1.nii.gz"], model_dir, out1) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "s1" in err and "IndexError" in err
    assert not out1.exists() or final_files(out1) == []


def test_parts_cover_every_case_once(tmp_path: Path, model_dir: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(5):
        write_nifti(folder / f"p{i}.nii.gz", i)
    out = tmp_path / "out"
    for k in range(3):
        assert _predict([folder], model_dir, out, "--num-parts", "3", "--part-id", str(k),
                        "--num-workers", str(k)) == 0
    ids = [c["id"] for k in range(3) for c in manifest(out, f"run.part{k}of3.json")["cases"]]
    assert sorted(ids) == [f"p{i}" for i in range(5)]
    assert sorted(n for n in final_files(out) if n.endswith("_seg.nii.gz")) == \
        [f"p{i}_seg.nii.gz" for i in range(5)]
    assert _predict([folder], model_dir, out, "--num-parts", "3", "--part-id", "3") == 2


def test_plan_split_and_ids_do_not_depend_on_order(tmp_path: Path) -> None:
    from medinfer.batch import RunInfo, plan_cases
    from medinfer.inference.cli import CaseInput

    info = RunInfo("m", "sha256:0", {})
    cases = [CaseInput(tmp_path / d / "scan.nii.gz", "nifti") for d in ("x", "y")]
    cases += [CaseInput(tmp_path / f"c{i}.nii.gz", "nifti") for i in range(10)]
    parts = [plan_cases(cases, tmp_path, info, num_parts=4, part_id=k) for k in range(4)]
    flat = [s.case_id for p in parts for s in p]
    assert len(flat) == 12 and len(set(flat)) == 12
    scan_ids = sorted(i for i in flat if i.startswith("scan"))
    assert len(scan_ids) == 2 and all(i.startswith("scan-") for i in scan_ids)
    reversed_ids = {s.case_id for s in plan_cases(cases[::-1], tmp_path, info)}
    assert reversed_ids == set(flat)


def test_devices_spread_cases_and_equal_one_device(tmp_path: Path, model_dir: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        write_nifti(folder / f"d{i}.nii.gz", i)
    assert _predict([folder], model_dir, tmp_path / "one", "--num-workers", "0") == 0
    assert _predict([folder], model_dir, tmp_path / "two", "--devices", "cpu,cpu") == 0
    workers = {c["worker"] for c in manifest(tmp_path / "two")["cases"]}
    assert workers <= {"0:cpu", "1:cpu"} and all(workers)
    for i in range(3):
        one = np.asarray(nib.load(str(tmp_path / "one" / f"d{i}_seg.nii.gz")).dataobj)
        two = np.asarray(nib.load(str(tmp_path / "two" / f"d{i}_seg.nii.gz")).dataobj)
        np.testing.assert_array_equal(one, two)
    assert _predict([folder], model_dir, tmp_path / "bad", "--devices", "cpu,tpu") == 2


def test_ray_option_without_ray_says_how_to_install(
        tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from medinfer.distributed import fill_bare_ray_option

    assert fill_bare_ray_option(["predict", "--ray", "a.nii.gz", "-o", "o"]) == \
        ["predict", "--ray", "local", "a.nii.gz", "-o", "o"]
    assert fill_bare_ray_option(["predict", "x", "--ray"])[-1] == "local"
    for address in ("auto", "10.0.0.1:6379", "head-node:6379", "ray://h:10001"):
        assert fill_bare_ray_option(["--ray", address, "x"]) == ["--ray", address, "x"]
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    scan = write_nifti(tmp_path / "r.nii.gz", 1)
    assert _predict([scan], model_dir, tmp_path / "out", "--ray") == 2
    err = capsys.readouterr().err
    assert "pip install 'medinfer[ray]'" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_stale_temporaries_of_this_case_only(tmp_path: Path) -> None:
    from medinfer._atomic import atomic_paths
    from medinfer.batch import remove_stale_temporaries

    finals = {"seg": tmp_path / "a_seg.nii.gz", "stats": tmp_path / "a_stats.json",
              "other": tmp_path / "a_b_seg.nii.gz"}
    with pytest.raises(RuntimeError), atomic_paths(finals) as tmp:
        # what a killed run leaves: temporaries named as medinfer._atomic names them
        for p in tmp.values():
            p.write_bytes(b"partial")
            (tmp_path / p.name.replace(".part", ".x.part")).write_bytes(b"partial")
            # what earlier runs left when killed inside a writer that nested its own
            # temporary (".<tmp name>.<random>.part<suffix>": two leading dots)
            (tmp_path / f".{p.name}.q7z.part{''.join(p.suffixes[-1:])}").write_bytes(b"p")
        raise RuntimeError("killed")
    names = {p.name for p in tmp_path.iterdir()}
    assert len(names) == 6 and all(n.startswith(".") for n in names)
    remove_stale_temporaries(tmp_path, "a")
    left = sorted(os.listdir(tmp_path))
    assert len(left) == 2, left
    assert left[0].startswith("..a_b_seg.nii.gz") and left[1].startswith(".a_b_seg.nii.gz")


def test_stale_manifest_temporaries_of_this_part_only(tmp_path: Path) -> None:
    """A run killed while it rewrote run.json / cases.csv leaves their temporaries; the
    next run over the folder removes its own and leaves another part's alone."""
    import tempfile

    from medinfer.batch import Manifest, RunInfo

    info = RunInfo("m", "sha256:0", {})

    def leftover(final: str) -> str:
        suffix = "".join(Path(final).suffixes[-1:])
        fd, name = tempfile.mkstemp(prefix=f".{final}.", suffix=".part" + suffix,
                                    dir=tmp_path)
        os.close(fd)
        return Path(name).name

    mine = {leftover("cases.csv"), leftover("run.json")}
    other = {leftover("cases.part1of2.csv"), leftover("run.part1of2.json")}
    (tmp_path / "cases.csv").write_text("final\n")
    Manifest(tmp_path, info, []).remove_stale_temporaries()
    left = set(os.listdir(tmp_path))
    assert not mine & left
    assert left == other | {"cases.csv"}
    Manifest(tmp_path, info, [], num_parts=2, part_id=1).remove_stale_temporaries()
    assert set(os.listdir(tmp_path)) == {"cases.csv"}
