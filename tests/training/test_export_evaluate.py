"""Acceptance 5 (export equal to 1e-4, predict runs on the folder) and the
``medinfer evaluate`` outputs (acceptance 3's tables and figures)."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from training_toy import run_cli as _cli
from training_toy import tiny_config

from medinfer.models import load_model, resolve_model
from medinfer.models.loaders import load_onnx, load_torchscript
from medinfer.training import train
from medinfer.training.evaluate import evaluate_model
from medinfer.training.export import EXPORT_ATOL


def test_export_predict_evaluate(toy_data, tmp_path, capsys):
    images, labels = toy_data
    out = tmp_path / "model"
    result = train(tiny_config(images, labels, out, max_steps=3, val_every=3,
                               spacing=[1.0, 1.0, 2.0], orientation="RAS"))
    assert result.steps == 3 and (out / "training curves.png").is_file()
    # after training: the suite's figures for the validation case
    assert (out / "evaluation" / "IoU image z axis.png").is_file()
    (val_row,) = list(csv.DictReader((out / "evaluation" / "metrics.csv").open()))[:1]
    assert val_row["case"] in ("case0", "case1")

    card, folder = resolve_model(out)
    assert card.architecture is not None and card.architecture.network.value == "UNet"
    assert card.input.orientation == "RAS"
    prov = card.provenance
    assert prov["training_config"]["max_steps"] == 3 and "training_command" in prov
    ref = load_model(card, folder, "cpu")
    ts = load_torchscript(out / "model.ts")
    onnx = load_onnx(out / "model.onnx")
    gen = torch.Generator().manual_seed(1)
    for shape in ((16, 16, 16), (24, 16, 32)):
        x = torch.randn((1, 1, *shape), generator=gen)
        with torch.no_grad():
            r = ref(x)
            assert float((ts(x) - r).abs().max()) <= EXPORT_ATOL
            assert float((onnx(x) - r).abs().max()) <= EXPORT_ATOL

    # medinfer predict --model <exported folder> runs and writes the label map on the
    # source grid (oblique, LPS-like, anisotropic)
    scan = images / "case0_0000.nii.gz"
    pred_dir = tmp_path / "pred"
    assert _cli(["predict", "--model", str(out), "--device", "cpu", "-o", str(pred_dir),
                 str(scan)]) == 0
    written = sorted(p for p in pred_dir.rglob("*.nii.gz"))
    assert written
    lab = nib.load(written[0])
    assert lab.shape[:3] == nib.load(scan).shape
    assert np.allclose(lab.affine, nib.load(scan).affine, atol=1e-4)

    # medinfer evaluate: tables, figures with the suite's names
    ev = tmp_path / "eval"
    assert _cli(["evaluate", "--model", str(out), "--images", str(images),
                 "--labels", str(labels), "-o", str(ev), "--device", "cpu"]) == 0
    for name in ("IoU.png", "IoU image z axis.png", "model predictions.png",
                 "overlay errors.png", "metrics.csv", "summary.csv", "iou_z.csv"):
        assert (ev / name).stat().st_size > 0, name
    rows = list(csv.DictReader((ev / "metrics.csv").open()))
    assert [(r["case"], r["label"]) for r in rows] == [
        ("case0", "1"), ("case0", "2"), ("case1", "1"), ("case1", "2")]
    # evaluate's Dice equals the Dice of the same model's predict output, by hand
    truth = np.asarray(nib.load(labels / "case0.nii.gz").dataobj).astype(int)
    pred = np.asarray(lab.dataobj).astype(int)
    for c in (1, 2):
        p, g = pred == c, truth == c
        dice = 1.0 if p.sum() + g.sum() == 0 else 2 * (p & g).sum() / (p.sum() + g.sum())
        assert float(rows[c - 1]["dice"]) == pytest.approx(dice, rel=1e-6)
    zrows = [r for r in csv.DictReader((ev / "iou_z.csv").open())
             if r["case"] == "case0" and r["label"] == "1"]
    assert len(zrows) == truth.shape[int(zrows[0]["axis"])]
    summary = json.loads((ev / "metrics.json").read_text())["summary"]
    assert set(summary) == {"class 1", "class 2"}

    # bad input: exit 2, one message, no traceback
    assert _cli(["evaluate", "--model", str(out), "--images", str(tmp_path / "missing"),
                 "-o", str(ev)]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err


def test_evaluate_refuses_mask_off_the_image_grid(toy_data, tmp_path):
    images, labels = toy_data
    p = labels / "case1.nii.gz"
    img = nib.load(p)
    shifted = img.affine.copy()
    shifted[:3, 3] += 1.5
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), p)
    from medinfer.errors import GeometryError

    with pytest.raises(GeometryError, match="case1.*world grid"):
        evaluate_model("demo-brain", tmp_path / "ev", images=images, labels=labels,
                       device="cpu")
