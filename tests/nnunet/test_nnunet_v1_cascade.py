"""nnU-Net v1 cascades (``3d_lowres`` -> ``3d_cascade_fullres``): same labels as nnU-Net
v1's own ``nnUNet_predict``.

The two-stage plans, the ``nnUNetTrainerV2`` low-resolution model and the
``nnUNetTrainerV2CascadeFullRes`` model are made by nnU-Net v1's own planner, trainers
and checkpoint writer (:mod:`nnunet_v1_cascade_oracle`, cached); v1's predictor runs in
its own process on CPU (its outputs cached per input).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nnunet_compare import check_labels as _check
from nnunet_compare import load_case as _load
from nnunet_compare import read_labels as _labels
from nnunet_oracle import blob_case, oblique_affine, save_nifti
from nnunet_v1_cascade_oracle import (
    CASCADE_TRAINER,
    PLANS,
    TASK,
    TRAINER,
    cached_v1_predictions,
    results_root,
)

from medinfer.formats.nnunet_cli import run
from medinfer.formats.nnunet_v1 import NnUNetV1Predictor

pytestmark = pytest.mark.timeout(2400)

CASES = {
    # the training grid (axis-aligned)
    "aligned": ((64, 16, 60), (0.8, 3.0, 0.8), None),
    # oblique, LPS-like flips, another anisotropic spacing
    "oblique": ((50, 20, 46), (0.95, 2.2, 1.1), 17.0),
    # the same, smaller (TTA on)
    "oblique_small": ((34, 14, 30), (0.95, 2.2, 1.1), 23.0),
}
#: v1's mirroring TTA is slow on CPU: the TTA-on comparison runs on a small oblique case
TTA_CASES = {False: ("aligned", "oblique"), True: ("oblique_small",)}


@pytest.fixture(scope="module")
def results() -> Path:
    return results_root()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    base = tmp_path_factory.mktemp("v1c_in")
    rng = np.random.default_rng(7)
    for name, (shape, spacing, angle) in CASES.items():
        img, _ = blob_case(rng, shape, spacing)
        aff = np.diag([*spacing, 1.0]) if angle is None else oblique_affine(spacing, angle)
        for c in range(2):
            save_nifti(img[c], aff, base / f"{name}_{c:04d}.nii.gz")
    out = {}
    for tta, names in TTA_CASES.items():
        d = tmp_path_factory.mktemp(f"v1c_in_tta{int(tta)}")
        for name in names:
            for f in base.glob(f"{name}_*.nii.gz"):
                (d / f.name).write_bytes(f.read_bytes())
        out[tta] = d
    return out


@pytest.fixture(scope="module")
def oracle(results: Path, inputs: dict[bool, Path]) -> dict[bool, Path]:
    return {tta: cached_v1_predictions(d, tta=tta) for tta, d in inputs.items()}


def _cascade_dir(results: Path) -> Path:
    return results / "nnUNet" / "3d_cascade_fullres" / TASK / f"{CASCADE_TRAINER}__{PLANS}"


@pytest.mark.parametrize("tta", [False, True])
def test_cascade_same_labels_as_nnunet_v1_predict(results: Path, inputs: dict[bool, Path],
                                                   oracle: dict[bool, Path], tta: bool) -> None:
    predictor = NnUNetV1Predictor(_cascade_dir(results), device="cpu", tta=tta)
    assert predictor.v1.is_cascade and predictor.v1.network_input_channels == 4
    low = predictor.lowres_predictor()
    assert low.v1.stage == 0 and predictor.v1.stage == 1
    assert low.v1.path.parent.parent.name == "3d_lowres"
    for name in TTA_CASES[tta]:
        vol = _load(inputs[tta], name)
        low_lab = low.predict(vol).label.array[0].astype(np.int64)
        _check(low_lab, _labels(oracle[tta] / "3d_lowres_predictions" / f"{name}.nii.gz"),
               f"v1 3d_lowres {name} tta={tta}")
        pred = predictor.predict(vol)  # predicts the low-resolution stage itself
        assert pred.label.spatial_shape == vol.spatial_shape
        np.testing.assert_allclose(pred.label.affine, vol.affine, atol=1e-6)
        _check(pred.label.array[0].astype(np.int64), _labels(oracle[tta] / f"{name}.nii.gz"),
               f"v1 3d_cascade_fullres {name} tta={tta}")


def test_previous_stage_steers_the_cascade(results: Path, inputs: dict[bool, Path],
                                           oracle: dict[bool, Path]) -> None:
    """The low-resolution map given as an array equals the one predicted inside; an empty
    map changes the result (the extra channels are used), a map on another grid is refused."""
    from medinfer.errors import InvalidImageError, ModelError

    predictor = NnUNetV1Predictor(_cascade_dir(results), device="cpu", tta=False)
    vol = _load(inputs[False], "oblique")
    ref = _labels(oracle[False] / "oblique.nii.gz")
    low = _labels(oracle[False] / "3d_lowres_predictions" / "oblique.nii.gz")
    got = predictor.predict(vol, previous_stage=low).label.array[0]
    assert np.array_equal(got, ref)
    empty = predictor.predict(vol, previous_stage=np.zeros_like(low)).label.array[0]
    assert np.sum(empty != ref) > 100
    with pytest.raises(InvalidImageError, match="previous-stage"):
        predictor.predict(vol, previous_stage=low[:-1])
    with pytest.raises(ModelError, match="not a cascade"):
        predictor.lowres_predictor().predict(vol, previous_stage=low)


def test_cascade_command_line(results: Path, inputs: dict[bool, Path],
                              oracle: dict[bool, Path], tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """``nnUNet_predict -m 3d_cascade_fullres`` without ``-l`` (low-resolution stage first,
    into ``3d_lowres_predictions``), with ``-l``, and ``-l`` refused for a non-cascade."""
    monkeypatch.setenv("RESULTS_FOLDER", str(results))
    flags = ["-t", TASK, "-tr", TRAINER, "-ctr", CASCADE_TRAINER, "-p", PLANS, "-f", "0",
             "--disable_tta"]
    out = tmp_path / "out"
    assert run(["-i", str(inputs[False]), "-o", str(out), "-m", "3d_cascade_fullres",
                *flags], "v1") == 0
    for name in TTA_CASES[False]:
        for sub in ("3d_lowres_predictions/", ""):
            assert np.array_equal(_labels(out / f"{sub}{name}.nii.gz"),
                                  _labels(oracle[False] / f"{sub}{name}.nii.gz")), (sub, name)
    assert (out / "3d_lowres_predictions" / "plans.pkl").is_file()
    out_l = tmp_path / "out_l"
    assert run(["-i", str(inputs[False]), "-o", str(out_l), "-m", "3d_cascade_fullres",
                "-l", str(oracle[False] / "3d_lowres_predictions"), *flags], "v1") == 0
    assert not (out_l / "3d_lowres_predictions").exists()
    for name in TTA_CASES[False]:
        assert np.array_equal(_labels(out_l / f"{name}.nii.gz"),
                              _labels(oracle[False] / f"{name}.nii.gz")), name
    capsys.readouterr()
    code = run(["-i", str(inputs[False]), "-o", str(tmp_path / "bad"), "-m", "3d_lowres",
                "-l", str(out_l), *flags], "v1")
    assert code == 2 and "not a cascade" in capsys.readouterr().err
    code = run(["-i", str(inputs[False]), "-o", str(tmp_path / "bad"), "-m",
                "3d_cascade_fullres", "-l", str(tmp_path), *flags], "v1")
    assert code == 2 and "no low-resolution segmentation" in capsys.readouterr().err
