"""Scans that do not fit the model card's input contract (issue 17 item 6).

A CT through the MR-only demo-brain, an MR through a CT model and single 2-D slices
through 3-D models used to run without a word. Now each mismatch is warned about, or
refused where the card says ``input.mismatch: refuse`` (unless ``force``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from medinfer.errors import InvalidImageError
from medinfer.inference import Predictor
from medinfer.inference.contract import check_input_contract, input_contract_issues
from medinfer.io import load
from medinfer.models import ModelCard, resolve_model
from medinfer.volume import Volume

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "t1_sample.nii.gz"
AFFINE = np.array([[-0.8, 0.1, 0.0, 90.0], [0.1, 0.8, 0.0, -120.0], [0.0, 0.0, 2.5, -60.0],
                   [0.0, 0.0, 0.0, 1.0]])


def _card(modality: str, mismatch: str = "warn") -> ModelCard:
    return ModelCard.from_dict({
        "name": "contract-probe", "version": "0",
        "labels": {0: {"name": "bg"}, 1: {"name": "fg"}},
        "input": {"modality": modality, "spacing": [2.0, 2.0, 2.0], "mismatch": mismatch,
                  "normalization": {"method": "zscore"}},
        "inference": {"patch_size": [8, 8, 8]},
        "weights": {"format": "torchscript", "file": "unused.ts"},
    })


def _ct(shape: tuple[int, int, int] = (20, 18, 12), meta: dict | None = None) -> Volume:
    """A body in HU: soft tissue (40) surrounded by air (-1000)."""
    arr = np.full(shape, -1000.0, dtype=np.float32)
    arr[3:-3, 3:-3, :] = 40.0 + np.random.default_rng(0).normal(0, 10, (shape[0] - 6,
                                                                           shape[1] - 6,
                                                                           shape[2]))
    return Volume(arr, AFFINE, {"source": "ct.nii.gz", **(meta or {})})


def test_fitting_scans_have_no_issues() -> None:
    card, _ = resolve_model("demo-brain")
    assert input_contract_issues(load(SAMPLE), card) == []
    assert input_contract_issues(_ct(), _card("CT")) == []
    assert input_contract_issues(_ct(meta={"modality": "CT"}), _card("CT")) == []


def test_ct_through_an_mr_model_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    card, _ = resolve_model("demo-brain")  # modality MR, mismatch: warn
    with caplog.at_level(logging.WARNING, logger="medinfer.inference.contract"):
        issues = check_input_contract(_ct(), card)
    assert len(issues) == 1 and "look like a CT in Hounsfield units" in issues[0]
    assert "ct.nii.gz: does not fit model 'demo-brain'" in caplog.text
    stated = input_contract_issues(_ct(meta={"modality": "CT"}), card)
    assert stated == ["the scan's DICOM Modality is 'CT', the model expects 'MR'"]


def test_mr_through_a_ct_model_and_2d_slices() -> None:
    mr = load(SAMPLE)
    issues = input_contract_issues(mr, _card("CT"))
    assert len(issues) == 1 and "do not look like a CT in Hounsfield units" in issues[0]
    one = Volume(mr.array[:, :, :, 40:41], mr.affine, mr.meta)
    issues = input_contract_issues(one, resolve_model("demo-brain")[0])
    assert len(issues) == 1 and "a single 2-D slice" in issues[0]


def test_refusing_card_raises_unless_forced() -> None:
    card = _card("MR", mismatch="refuse")
    net = lambda t: t  # noqa: E731 - preprocess never calls the network
    with pytest.raises(InvalidImageError, match=r"ct.nii.gz: does not fit model "
                                                r"'contract-probe'.*--force"):
        Predictor(card, net, device="cpu").preprocess(_ct())
    image, _ = Predictor(card, net, device="cpu", force=True).preprocess(_ct())
    assert image.array.dtype == np.float32
    with pytest.raises(Exception, match="mismatch"):
        _card("MR", mismatch="sometimes")


def test_cli_refuses_then_force_runs(tmp_path: Path, model_dir: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    import nibabel as nib
    import yaml
    from inference_helpers import card_dict

    from medinfer.cli import main

    card = card_dict()
    card["input"] = {**card["input"], "modality": "CT", "mismatch": "refuse"}
    (model_dir / "model.yaml").write_text(yaml.safe_dump(card))
    mr = (np.random.default_rng(0).normal(size=(14, 12, 6)) * 50 + 300).astype(np.int16)
    nib.save(nib.Nifti1Image(mr, AFFINE), str(tmp_path / "mr.nii.gz"))
    args = ["predict", str(tmp_path / "mr.nii.gz"), "--model", str(model_dir), "--device",
            "cpu", "--no-tta"]
    with pytest.raises(SystemExit) as info:
        main([*args, "-o", str(tmp_path / "refused")])
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "do not look like a CT in Hounsfield units" in err and "--force" in err
    assert not list((tmp_path / "refused").glob("*_seg.nii.gz"))
    with pytest.raises(SystemExit) as info:
        main([*args, "-o", str(tmp_path / "forced"), "--force"])
    assert info.value.code in (0, None)
    assert (tmp_path / "forced" / "mr_seg.nii.gz").is_file()
