"""nnU-Net v2 cascades (``3d_lowres`` -> ``3d_cascade_fullres`` with
``-prev_stage_predictions``): same labels as ``nnUNetv2_predict``.

Models made by nnunetv2's own trainer class and checkpoint writer
(:mod:`nnunet_cascade_oracle`, cached); nnunetv2 runs in its own environment, its outputs
cached per input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nnunet_cascade_oracle import TRAINER, cached_cascade_predictions, cascade_results
from nnunet_compare import check_labels as _check
from nnunet_compare import load_case as _load
from nnunet_compare import read_labels as _labels
from nnunet_oracle import DATASET, DATASET_ID, SPACING, write_cases

from medinfer import io
from medinfer.formats.nnunet import NnUNetPredictor
from medinfer.formats.nnunet_cli import run

pytestmark = pytest.mark.timeout(2400)

CASES = {
    "aligned": ((44, 14, 40), SPACING, None),
    # oblique, LPS-like flips, another anisotropic spacing (separate-z resampling)
    "oblique": ((37, 18, 30), (0.95, 2.2, 1.1), 17.0),
}


@pytest.fixture(scope="module")
def results() -> Path:
    return cascade_results()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("casc_in")
    return write_cases(d, CASES, 31)


@pytest.fixture(scope="module")
def oracle(results: Path, inputs: Path) -> dict[str, Path]:
    return cached_cascade_predictions(inputs)


def _folder(results: Path, cfg: str) -> Path:
    return results / DATASET / f"{TRAINER}__nnUNetPlans__{cfg}"


@pytest.mark.parametrize("accumulate", ["float16", "float32"])
def test_lowres_and_cascade_same_labels_as_nnunetv2_predict(
        results: Path, inputs: Path, oracle: dict[str, Path], accumulate: str) -> None:
    """float16: nnU-Net's own accumulation, Dice >= 0.999 (0 differing voxels for the
    cascade here); float32 (medinfer's CPU default): a few voxels differ at near-ties of the
    untrained network, Dice >= 0.99 as for the other v2 models (test_nnunet.py)."""
    min_dice = 0.999 if accumulate == "float16" else 0.99
    low = NnUNetPredictor(_folder(results, "3d_lowres"), device="cpu", tta=False,
                          accumulate=accumulate)
    casc = {tta: NnUNetPredictor(_folder(results, "3d_cascade_fullres"), device="cpu", tta=tta,
                                 accumulate=accumulate)
            for tta in (False, True)}
    assert casc[False].folder.previous_stage == "3d_lowres"
    assert casc[False].folder.network_input_channels == 4
    for name in CASES:
        vol = _load(inputs, name)
        _check(low.predict(vol).label.array[0].astype(np.int64),
               _labels(oracle["lowres"] / f"{name}.nii.gz"), f"v2 3d_lowres {name} {accumulate}",
               min_dice)
        prev = io.load(oracle["lowres"] / f"{name}.nii.gz")
        for tta, key in ((False, "cascade"), (True, "cascade_tta")):
            pred = casc[tta].predict(vol, previous_stage=prev)
            assert pred.label.spatial_shape == vol.spatial_shape
            ours = pred.label.array[0].astype(np.int64)
            ref = _labels(oracle[key] / f"{name}.nii.gz")
            _check(ours, ref, f"v2 3d_cascade_fullres {name} tta={tta} {accumulate}", min_dice)
            if accumulate == "float16":
                assert np.array_equal(ours, ref), (name, tta)


def test_cascade_needs_and_uses_the_previous_stage(results: Path, inputs: Path,
                                                   oracle: dict[str, Path]) -> None:
    from medinfer.errors import ConfigError, InvalidImageError, ModelError

    casc = NnUNetPredictor(_folder(results, "3d_cascade_fullres"), device="cpu", tta=False)
    vol = _load(inputs, "oblique")
    ref = _labels(oracle["cascade"] / "oblique.nii.gz")
    prev = _labels(oracle["lowres"] / "oblique.nii.gz")
    empty = casc.predict(vol, previous_stage=np.zeros_like(prev)).label.array[0]
    assert np.sum(empty != ref) > 50
    with pytest.raises(ConfigError, match="cascade"):
        casc.predict(vol)
    with pytest.raises(InvalidImageError, match="previous-stage"):
        casc.predict(vol, previous_stage=prev[:, :-1])
    low = NnUNetPredictor(_folder(results, "3d_lowres"), device="cpu", tta=False)
    with pytest.raises(ModelError, match="not a cascade"):
        low.predict(vol, previous_stage=prev)


def test_prev_stage_predictions_flag(results: Path, inputs: Path, oracle: dict[str, Path],
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("nnUNet_results", str(results))
    flags = ["-i", str(inputs), "-d", str(DATASET_ID), "-tr", TRAINER, "-f", "0",
             "--disable_tta", "-device", "cpu"]
    out = tmp_path / "out"
    assert run([*flags, "-o", str(out), "-c", "3d_cascade_fullres",
                "-prev_stage_predictions", str(oracle["lowres"])], "v2") == 0
    for name in CASES:
        _check(_labels(out / f"{name}.nii.gz"), _labels(oracle["cascade"] / f"{name}.nii.gz"),
               f"medinfer-nnUNetv2_predict {name}", 0.99)
    capsys.readouterr()
    assert run([*flags, "-o", str(tmp_path / "o2"), "-c", "3d_cascade_fullres"], "v2") == 2
    assert "-prev_stage_predictions" in capsys.readouterr().err
    assert run([*flags, "-o", str(tmp_path / "o3"), "-c", "3d_lowres",
                "-prev_stage_predictions", str(oracle["lowres"])], "v2") == 2
    assert "not a cascade" in capsys.readouterr().err
    assert run([*flags, "-o", str(tmp_path / "o4"), "-c", "3d_cascade_fullres",
                "-prev_stage_predictions", str(tmp_path)], "v2") == 2
    assert "no segmentation" in capsys.readouterr().err


def test_region_based_v2_model_same_labels_as_nnunetv2_predict(inputs: Path) -> None:
    """Region labels in dataset.json (sigmoid heads, painted in ``regions_class_order``)."""
    from nnunet_cascade_oracle import cached_region_predictions, region_results

    ref_dir = cached_region_predictions(inputs)
    folder = _folder(region_results(), "3d_fullres")
    predictor = NnUNetPredictor(folder, device="cpu", tta=False, accumulate="float16")
    assert predictor.folder.regions_class_order == [1, 2]
    assert predictor.folder.num_heads == 2
    for name in CASES:
        ours = predictor.predict(_load(inputs, name)).label.array[0].astype(np.int64)
        _check(ours, _labels(ref_dir / f"{name}.nii.gz"), f"v2 regions {name}")
