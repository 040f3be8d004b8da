"""Tests of the shared helpers: atomic writes, enum parsing, the CLI frame."""

import enum
from pathlib import Path

import pytest

from medinfer._atomic import atomic_path, write_text_atomic
from medinfer.cli import main
from medinfer.errors import ConfigError, parse_enum


class Blend(enum.Enum):
    GAUSSIAN = "gaussian"
    CONSTANT = "constant"


def test_parse_enum_accepts_members_and_strings_and_lists_allowed():
    assert parse_enum(Blend, "Gaussian", "blending") is Blend.GAUSSIAN
    assert parse_enum(Blend, Blend.CONSTANT, "blending") is Blend.CONSTANT
    with pytest.raises(ConfigError, match=r"blending: 'linearx'.*'gaussian', 'constant'"):
        parse_enum(Blend, "linearx", "blending")


def test_atomic_path_leaves_nothing_on_error(tmp_path: Path):
    target = tmp_path / "out" / "case_seg.nii.gz"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == target.parent
        tmp.write_bytes(b"half")
        raise RuntimeError("crash while writing")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_writer_inside_atomic_paths_does_not_nest(tmp_path: Path):
    """A writer that is itself atomic (write_nifti), handed a temporary of
    atomic_paths, writes into it: one temporary per file, one rename."""
    import numpy as np

    from medinfer._atomic import atomic_paths
    from medinfer.io.nifti import read_nifti, write_nifti
    from medinfer.volume import Volume

    final = tmp_path / "c_seg.nii.gz"
    vol = Volume(np.arange(24, dtype=np.int16).reshape(1, 2, 3, 4), np.diag([2.0, 1, 3, 1]))
    seen: list[list[str]] = []
    with atomic_paths({"seg": final}) as tmp:
        with atomic_path(tmp["seg"]) as inner:
            assert inner == tmp["seg"]
            seen.append(sorted(p.name for p in tmp_path.iterdir()))
        write_nifti(vol, tmp["seg"])  # into the temporary, renamed by atomic_paths
        assert final.exists() is False
    assert seen == [[tmp["seg"].name]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c_seg.nii.gz"]
    np.testing.assert_array_equal(np.asarray(read_nifti(final).array), vol.array)
    with atomic_path(final) as again:  # no longer a live temporary: a fresh one
        assert again != tmp["seg"] and again.name.startswith(".c_seg.nii.gz.")
        again.write_bytes(b"x")


def test_atomic_write_replaces_existing(tmp_path: Path):
    target = tmp_path / "a.json"
    write_text_atomic(target, "one")
    write_text_atomic(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_cli_version_and_usage_error_exit_codes(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == "0.1.0"
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_atomic_output_gets_umask_permissions(tmp_path: Path):
    from medinfer import _atomic

    out = write_text_atomic(tmp_path / "r.json", "{}")
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_atomic._UMASK
    assert out.stat().st_mode & 0o044  # group/other can read (mkstemp alone gives 0600)


def test_folds_accepts_space_separated_values_like_nnunet():
    from medinfer.cli import join_multi_value_options

    assert join_multi_value_options(
        ["predict", "a.nii.gz", "--folds", "0", "1", "3", "-o", "out"]
    ) == ["predict", "a.nii.gz", "--folds", "0,1,3", "-o", "out"]
    assert join_multi_value_options(["predict", "--folds", "all", "b.nii"]) == [
        "predict", "--folds", "all", "b.nii"]
    assert join_multi_value_options(["predict", "--folds", "0", "scan.nii"]) == [
        "predict", "--folds", "0", "scan.nii"]
