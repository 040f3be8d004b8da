"""Simulated acquisitions (``acquisition:``), multi-channel cases, the wall-clock budget.

The clean bank item must be exactly what the engine makes of the case (the Predictor's
``to_model_grid`` + ``normalize_intensity``); simulated items must keep image and labels
on one grid (the bright object stays labelled) and be seeded. Multi-channel cases
(``<case>_0000``, ``<case>_0001``) train a network with two input channels whose model
folder the Predictor runs on a two-channel scan.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from training_toy import make_case, oblique_affine, tiny_config, write_dataset

from medinfer.errors import ConfigError, GeometryError
from medinfer.training import train
from medinfer.training.acquisition import AcquisitionSim, simulate
from medinfer.training.data import find_pairs, load_source_case
from medinfer.transforms import normalize_intensity, resample_to_grid, to_model_grid
from medinfer.volume import Volume

NORM = {"method": "percentile", "lower": 0.5, "upper": 99.5, "nonzero": True}


def _toy() -> tuple[Volume, Volume]:
    img, lab, aff = make_case(0)
    return Volume(img[None] + 1.5, aff, {}), Volume(lab[None].astype(np.int16), aff, {})


def test_clean_item_is_the_engine_view_and_items_are_seeded() -> None:
    image, label = _toy()
    sim = AcquisitionSim(fov_margin_mm=(0.0, 0.0))
    rng = np.random.default_rng(0)
    img, lab, aff = simulate(image, label, sim, rng, orientation="RAS", spacing=(1.2,) * 3,
                             normalization=NORM, clean=True)
    grid, _ = to_model_grid(image, "RAS", (1.2,) * 3)
    np.testing.assert_allclose(aff, grid.affine)
    np.testing.assert_array_equal(img, normalize_intensity(grid, NORM).array)
    ref = resample_to_grid(label, grid.spatial_shape, grid.affine, interpolation="nearest")
    np.testing.assert_array_equal(lab, ref.array)

    def item(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return simulate(image, label, AcquisitionSim(mirror_prob=0.5),
                        np.random.default_rng(seed), orientation="RAS",
                        spacing=(1.2,) * 3, normalization=NORM)

    a, b, c = item(5), item(5), item(6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_simulated_acquisition_keeps_image_and_labels_together(seed: int) -> None:
    image, label = _toy()
    sim = AcquisitionSim(intensity_prob=0.0)  # geometry only: intensities stay ordered
    img, lab, aff = simulate(image, label, sim, np.random.default_rng(seed),
                             orientation="RAS", spacing=(1.0,) * 3,
                             normalization={"method": "none"})
    assert img.shape[1:] == lab.shape[1:] and img.dtype == np.float32
    assert set(np.unique(lab).tolist()) <= {0, 1, 2}
    # the objects (labels 1, 2 = +1, +2 over a 1.5 background) stay where they are labelled
    means = [float(img[0][(lab[0] == v) & (img[0] > 0.5)].mean()) for v in (0, 1, 2)]
    assert means[0] + 0.5 < means[1] and means[1] + 0.5 < means[2], means
    # the model grid is the engine's grid: RAS at 1 mm
    np.testing.assert_allclose(np.linalg.norm(aff[:3, :3], axis=0), 1.0)


def _two_channel_dataset(root: Path) -> tuple[Path, Path]:
    images, labels = root / "imagesTr", root / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(2):
        img, lab, aff = make_case(i)
        # channel 1 carries label 2 only, channel 0 label 1 only: both are needed
        c0 = np.where(lab == 2, 0.0, img).astype(np.float32)
        c1 = (np.where(lab == 2, 2.0, 0.0) + 0.05 * np.cos(img)).astype(np.float32)
        nib.save(nib.Nifti1Image(c0, aff), images / f"case{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(c1, aff), images / f"case{i}_0001.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), labels / f"case{i}.nii.gz")
    return images, labels


def test_multichannel_cases_train_and_predict(tmp_path: Path) -> None:
    from medinfer.inference import Predictor
    from medinfer.models import load_model, resolve_model

    images, labels = _two_channel_dataset(tmp_path / "d")
    pairs = find_pairs(images, labels)
    assert [len(p.images) for p in pairs] == [2, 2]
    img, lab = load_source_case(pairs[0])
    assert img.array.shape[0] == 2 and lab.array.shape[0] == 1
    cfg = tiny_config(images, labels, tmp_path / "run", max_steps=2, val_every=2,
                      export_formats=[], acquisition={"bank": 2, "rotate_deg": 10,
                                                      "fov_margin_mm": [0, 4]})
    result = train(cfg)
    assert result.steps == 2
    card, folder = resolve_model(str(tmp_path / "run"))
    assert card.input.channels == 2
    assert not (tmp_path / "run" / "model.onnx").exists()
    pred = Predictor(card, load_model(card, folder, "cpu"), device="cpu", tta=False)
    out = pred.predict(img)
    assert out.label.spatial_shape == img.spatial_shape


def test_channel_files_must_be_complete_and_on_one_grid(tmp_path: Path) -> None:
    images, labels = _two_channel_dataset(tmp_path / "d")
    (images / "case1_0001.nii.gz").rename(images / "case1_0002.nii.gz")
    with pytest.raises(ConfigError, match="case1"):
        find_pairs(images, labels)
    (images / "case1_0002.nii.gz").rename(images / "case1_0001.nii.gz")
    img, _, _ = make_case(0)
    nib.save(nib.Nifti1Image(img, oblique_affine(3)), images / "case0_0001.nii.gz")
    with pytest.raises(GeometryError, match="channel 1"):
        load_source_case(find_pairs(images, labels)[0])


def test_wall_clock_budget_stops_and_resumes(tmp_path: Path) -> None:
    images, labels = write_dataset(tmp_path / "d")
    cfg = tiny_config(images, labels, tmp_path / "run", max_steps=50, val_every=50,
                      max_minutes=1e-6, time_schedule=True)
    first = train(cfg, export=False)
    assert first.steps == 1 and first.timed_out
    assert first.log[-1]["val_metric"] is not None  # validated at the budget's end
    again = train(cfg, export=False)  # resumes; the budget is already spent
    assert again.resumed_from == 1 and again.steps == 2 and again.timed_out
    assert again.log[-1]["lr"] == 0.0  # the schedule ended with the budget
