"""Data pairing (three layouts), world-grid check, splits, config overrides, aliases."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from training_toy import make_case, write_dataset

from medinfer.errors import ConfigError, GeometryError
from medinfer.io import load
from medinfer.training import train, train_uneted
from medinfer.training.config import TrainConfig
from medinfer.training.data import check_same_grid, find_pairs, split_cases
from medinfer.training.loop import resolve_patience

ZOO = Path(__file__).resolve().parents[2] / "src/medinfer/models/zoo/demo-brain/model.yaml"


def test_layouts_pair_the_same_cases(tmp_path):
    images, labels = write_dataset(tmp_path / "nnunet", n=3)
    nn = find_pairs(images, labels)
    assert [p.case for p in nn] == ["case0", "case1", "case2"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        img, lab, aff = make_case(i)
        nib.save(nib.Nifti1Image(img, aff), flat / f"c{i}_img.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), flat / f"c{i}_seg.nii.gz")
    assert [p.case for p in find_pairs(flat)] == ["c0", "c1"]
    lst = tmp_path / "cases.json"
    lst.write_text(json.dumps([{"image": "flat/c1_img.nii.gz", "label": "flat/c1_seg.nii.gz",
                                "case": "x"}]))
    (only,) = find_pairs(cases=lst)
    assert only.case == "x" and only.label == tmp_path / "flat/c1_seg.nii.gz"
    (labels / "case2.nii.gz").unlink()
    with pytest.raises(ConfigError, match="case2"):
        find_pairs(images, labels)


def test_mask_on_another_world_grid_is_refused(tmp_path):
    img, lab, aff = make_case(0)
    flipped = aff.copy()
    flipped[:3, 0] *= -1          # same shape, other orientation
    nib.save(nib.Nifti1Image(img, aff), tmp_path / "a_img.nii.gz")
    nib.save(nib.Nifti1Image(lab, flipped), tmp_path / "a_seg.nii.gz")
    (pair,) = find_pairs(tmp_path)
    with pytest.raises(GeometryError, match="world grid"):
        check_same_grid(load(pair.image), load(pair.label), pair.case)
    with pytest.raises(GeometryError, match="case a"):
        train({"images": str(tmp_path), "out": str(tmp_path / "o"), "num_classes": 3,
               "max_steps": 1})


def test_splits_are_seeded_and_saved():
    ids = [f"c{i}" for i in range(10)]
    tr, va = split_cases(ids, val_cases=None, folds=5, fold=1, seed=4)
    assert len(va) == 2 and not set(tr) & set(va) and sorted(tr + va) == sorted(ids)
    assert split_cases(ids, val_cases=None, folds=5, fold=1, seed=4) == (tr, va)
    assert split_cases(ids, val_cases=["c3"], folds=5, fold=0, seed=0)[1] == ["c3"]
    with pytest.raises(ConfigError, match="val_cases"):
        split_cases(ids, val_cases=["nope"], folds=5, fold=0, seed=0)


def test_config_file_flags_and_patience_spellings(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"images": "imgs", "max_steps": 5, "network": "SegResNet"}))
    c = TrainConfig.from_yaml(cfg, {"max_steps": 9, "lr": None})
    assert c.max_steps == 9 and c.images == tmp_path / "imgs" and c.lr == 1e-3
    with pytest.raises(ConfigError, match="max_stepz"):
        TrainConfig.from_mapping({"max_stepz": 3})
    with pytest.raises(ConfigError, match="network"):
        TrainConfig.from_mapping({"network": "ResNet"})
    card = yaml.safe_load(ZOO.read_text())
    card["training"] = {"early-stopping": {"patience": 7}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(card))
    assert resolve_patience(TrainConfig.from_mapping(
        {"model_card": str(tmp_path / "model.yaml")})) == 7
    assert train_uneted is train
    assert np.isclose(TrainConfig().lr, 1e-3)


def test_example_config_validates():
    root = Path(__file__).resolve().parents[2]
    c = TrainConfig.from_yaml(root / "configs/train.yaml")
    assert c.n_classes == 4 and c.patch_size == (64, 64, 64)


def test_cli_flags_override_file_and_classes_come_from_the_data(toy_data, tmp_path):
    from training_toy import tiny_config

    from medinfer.cli import main
    from medinfer.models import resolve_model

    images, labels = toy_data
    cfg = tiny_config(images, labels, tmp_path / "unused", patch_size=[24, 24, 24],
                      max_steps=50)
    cfg.pop("num_classes")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "model"
    try:
        main(["train", "--config", str(path), "--out", str(out), "--max-steps", "1",
              "--patch-size", "16", "16", "16"])
    except SystemExit as exc:
        assert not exc.code
    card, _ = resolve_model(out)
    assert sorted(card.labels) == [0, 1, 2]
    assert card.inference.patch_size == (16, 16, 16)
    assert card.provenance["training_config"]["max_steps"] == 1
