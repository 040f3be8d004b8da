"""The FLAME analyzer configured with an nnU-Net v1 model folder gives the labels of
``medinfer nnunet predict`` (nnU-Net v1's command line) on the same cases (issue 14,
acceptance 5). The v1 folder is the one of tests/nnunet (made by nnU-Net v1's own code,
cached)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from fed_helpers import tar_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nnunet"))
from nnunet_oracle import blob_case, oblique_affine, save_nifti
from nnunet_v1_oracle import PLANS, TASK, TRAINER, build_v1_model

from medinfer import io as mio
from medinfer.cli import main as cli_main
from medinfer.federated.analyzer import NodeConfig, run_analysis

pytestmark = pytest.mark.timeout(2400)


def test_v1_folder_same_labels_as_nnunet_predict(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    folder = build_v1_model()
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(11)
    img, _ = blob_case(rng, (37, 18, 30), (0.95, 2.2, 1.1))
    aff = oblique_affine((0.95, 2.2, 1.1), 17.0)
    for c in range(2):
        save_nifti(img[c], aff, inp / f"blob_{c:04d}.nii.gz")
    out = tmp_path / "out"
    monkeypatch.setenv("RESULTS_FOLDER", str(folder.parents[2].parent))
    with pytest.raises(SystemExit) as info:
        cli_main(["nnunet", "predict", "-i", str(inp), "-o", str(out), "-t", TASK, "-tr",
                  TRAINER, "-p", PLANS, "-m", "3d_fullres", "--disable_tta"])
    assert info.value.code in (0, None)
    expected = mio.load(out / "blob.nii.gz")

    data = [{"site.tar.gz": tar_of({f"cases/{p.name}": p.read_bytes()
                                    for p in sorted(inp.iterdir())}, "w:gz")}]
    work = tmp_path / "work"
    work.mkdir()
    result = run_analysis(data, NodeConfig(model=str(folder), tta=False, multi_modal=True,
                                           device="cpu", work_dir=str(work)))
    assert result["status"] == "done", result.get("report")
    assert list(result["nifti_seg_bytes"]) == ["blob.nii.gz"]
    got_path = tmp_path / "got.nii.gz"
    got_path.write_bytes(result["nifti_seg_bytes"]["blob.nii.gz"])
    got = mio.load(got_path)
    assert np.allclose(got.affine, expected.affine, atol=1e-5)
    assert np.array_equal(got.array, expected.array)
    assert len(np.unique(expected.array)) > 1
    assert list(work.iterdir()) == []
