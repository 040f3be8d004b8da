"""nnU-Net v1 ``.pkl`` files are read with an allow-list: a ``__reduce__`` payload never runs."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from medinfer.errors import ModelError
from medinfer.models.nnunet_v1 import is_nnunet_v1_folder, read_nnunet_v1_folder
from medinfer.models.safe_pickle import load_pickle


class _Payload:
    """Pickles to ``os.system("touch <marker>")``: runs on a plain ``pickle.load``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _plans() -> dict:
    return {
        "num_stages": 1, "num_modalities": 1, "modalities": {0: "CT"},
        "normalization_schemes": OrderedDict([(0, "CT")]),
        "use_mask_for_norm": OrderedDict([(0, False)]),
        "original_spacings": [np.array([2.5, 0.8, 0.8])],
        "plans_per_stage": {0: {"patch_size": np.array([64, 128, 128]),
                                "current_spacing": np.array([2.5, 0.8, 0.8]),
                                "batch_size": np.int64(2), "do_dummy_2D_data_aug": False}},
        "dataset_properties": {"intensityproperties": {0: {"mean": np.float64(99.4),
                                                           "sd": 80.0}}},
        "transpose_forward": [0, 1, 2], "base_num_features": 32,
    }


def _folder(tmp_path: Path, plans_obj: object) -> Path:
    d = tmp_path / "nnUNetTrainerV2__nnUNetPlansv2.1"
    (d / "fold_0").mkdir(parents=True)
    (d / "plans.pkl").write_bytes(pickle.dumps(plans_obj))
    (d / "fold_0" / "model_final_checkpoint.model").write_bytes(b"x")
    return d


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_nnunet_plans_types_load(tmp_path: Path, protocol: int) -> None:
    f = tmp_path / "plans.pkl"
    f.write_bytes(pickle.dumps(_plans(), protocol=protocol))
    got = load_pickle(f)
    ref = _plans()
    assert isinstance(got["normalization_schemes"], OrderedDict)
    np.testing.assert_array_equal(got["plans_per_stage"][0]["patch_size"],
                                  ref["plans_per_stage"][0]["patch_size"])
    assert got["dataset_properties"]["intensityproperties"][0]["mean"] == 99.4


def test_reduce_payload_is_refused_and_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    plans = _plans()
    plans["evil"] = _Payload(marker)
    d = _folder(tmp_path, plans)
    assert is_nnunet_v1_folder(d)
    with pytest.raises(ModelError, match=r"posix\.system|os\.system|nt\.system"):
        read_nnunet_v1_folder(d)
    assert not marker.exists()
    # the same file does run its payload under a plain pickle.load: the test can fail
    pickle.loads((d / "plans.pkl").read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("target", [("builtins", "eval"), ("subprocess", "Popen"),
                                    ("numpy", "load"), ("builtins", "getattr")])
def test_other_globals_refused(tmp_path: Path, target: tuple[str, str]) -> None:
    mod, name = target
    data = f"c{mod}\n{name}\n(S'1'\ntR.".encode()  # protocol 0: GLOBAL, MARK, STRING, TUPLE, REDUCE
    f = tmp_path / "plans.pkl"
    f.write_bytes(data)
    with pytest.raises(ModelError, match=f"{mod}.{name}"):
        load_pickle(f)


def test_junk_and_empty(tmp_path: Path) -> None:
    f = tmp_path / "plans.pkl"
    f.write_bytes(b"not a pickle at all")
    with pytest.raises(ModelError, match="plans.pkl"):
        load_pickle(f)
    f.write_bytes(b"")
    with pytest.raises(ModelError, match="size 0"):
        load_pickle(f)


def test_v1_folder_reading(tmp_path: Path) -> None:
    d = _folder(tmp_path, _plans())
    (d / "fold_0" / "model_final_checkpoint.model.pkl").write_bytes(
        pickle.dumps({"name": "nnUNetTrainerV2", "init": ("plans.pkl", 0)}))
    folder = read_nnunet_v1_folder(d)
    assert folder.folds == ["0"] and folder.trainer_info["name"] == "nnUNetTrainerV2"
    with pytest.raises(ModelError, match="fold '3'"):
        read_nnunet_v1_folder(d, folds=["3"])


def test_resolve_model_names_a_v1_folder(tmp_path: Path) -> None:
    from medinfer.models import resolve_model

    d = _folder(tmp_path, _plans())
    with pytest.raises(ModelError, match="nnU-Net v1 model folder"):
        resolve_model(d)
