"""CLI: medinfer data metadata | cache | stats, and exit code 2 for bad input."""

import json

import pytest

from medinfer.cli import main


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_metadata_cache_stats(tmp_path, capsys):
    from dp_helpers import make_data_dir

    root = make_data_dir(tmp_path / "data", n_ct_studies=1)
    code, out, _ = _run(["data", "metadata", str(root), "-m", "mr*=mri", "-m", "*=ct"], capsys)
    assert code == 0 and "4 images in 4 studies (ct: 3, mri: 1)" in out
    assert (root / "metadata.json").is_file()
    code, out, _ = _run(["data", "cache", str(root), "--workers", "0"], capsys)
    assert code == 0 and "built 3, up to date 0, unusable 1, failed 0" in out
    code, out, _ = _run(["data", "cache", str(root), "-j", "0"], capsys)
    assert code == 0 and "built 0, up to date 4" in out
    code, out, _ = _run(["data", "stats", str(root), "--json"], capsys)
    stats = json.loads(out)
    assert code == 0 and stats["cached"] == 3 and stats["unusable"] == 1
    code, out, _ = _run(["data", "stats", str(root)], capsys)
    assert code == 0 and "cached 3, unusable 1, missing 0, stale 0" in out
    assert "unusable: ct99/ct_thin.nii.gz: 3 slices" in out


def test_bad_input_exits_2(tmp_path, capsys):
    code, _, err = _run(["data", "stats", str(tmp_path)], capsys)
    assert code == 2 and "metadata" in err and "Traceback" not in err
    (tmp_path / "raw" / "s1").mkdir(parents=True)
    (tmp_path / "raw" / "s1" / "a.nii.gz").write_bytes(b"x")
    code, _, err = _run(["data", "metadata", str(tmp_path), "-m", "bogus"], capsys)
    assert code == 2 and "'bogus' is not allowed" in err
    code, _, err = _run(["data", "metadata", str(tmp_path), "-m", "=ct"], capsys)
    assert code == 2 and "PATTERN=MODE" in err
