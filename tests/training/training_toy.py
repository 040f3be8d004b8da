"""Toy datasets for the training tests: small oblique, anisotropic, LPS-like volumes
(a uniquely named module: ``conftest`` is a name every test folder uses)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (20, 18, 22)


def oblique_affine(seed: int) -> np.ndarray:
    """An oblique (about 15 degrees), anisotropic (0.9 x 1.1 x 2.0 mm), LPS-flipped affine."""
    t = np.deg2rad(15.0 + seed)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([-0.9, -1.1, 2.0])
    a[:3, 3] = [30.0 + seed, -12.0, 5.0]
    return a


def make_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image (float32, noise + two bright blobs), label map (0/1/2 uint8), affine."""
    rng = np.random.default_rng(seed)
    idx = np.indices(SHAPE).astype(np.float32)
    img = rng.normal(0, 0.1, SHAPE).astype(np.float32)
    lab = np.zeros(SHAPE, np.uint8)
    for value, centre, r in ((1, (7 + seed, 8, 10), 4.0), (2, (13, 10 - seed, 12), 3.0)):
        d = np.sqrt(sum((idx[i] - c) ** 2 for i, c in enumerate(centre)))
        lab[d <= r] = value
        img[d <= r] += float(value)
    return img, lab, oblique_affine(seed)


def write_dataset(root: Path, n: int = 2) -> tuple[Path, Path]:
    """nnU-Net layout: imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz."""
    images, labels = root / "imagesTr", root / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(n):
        img, lab, aff = make_case(i)
        nib.save(nib.Nifti1Image(img, aff), images / f"case{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), labels / f"case{i}.nii.gz")
    return images, labels


def tiny_config(images: Path, labels: Path, out: Path, **kw: object) -> dict[str, object]:
    """A config that trains in well under a second per step on one CPU thread."""
    cfg: dict[str, object] = {
        "images": str(images), "labels": str(labels), "out": str(out),
        "num_classes": 3, "network": "UNet",
        "network_kwargs": {"channels": [4, 8, 16, 16], "strides": [2, 2, 2],
                           "num_res_units": 0},
        "patch_size": [16, 16, 16], "pad_multiple": 8, "batch_size": 2, "max_steps": 6,
        "val_every": 3, "checkpoint_every": 1, "lr": 0.01, "seed": 3,
        "normalization": {"method": "zscore"}, "device": "cpu",
    }
    cfg.update(kw)
    return cfg


def run_cli(args: list[str]) -> int:
    """Run ``medinfer ARGS`` in-process; the exit code (0 when main returns)."""
    from medinfer.cli import main

    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
