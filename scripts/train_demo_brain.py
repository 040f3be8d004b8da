"""Train the bundled ``demo-brain`` model and build its sample and test data.

Brain tissue segmentation of T1-weighted MRI: labels 0 background (outside the brain
mask), 1 CSF, 2 grey matter (GM), 3 white matter (WM). Everything is derived from the
MNI ICBM152 2009a template in ``../shared/data`` (see ``DATA_NOTICE.md``):

- brain mask = ``T1 > 0`` with holes filled (the template is skull-stripped);
- CSF probability = ``clip(255 - GM - WM, 0, 255)`` inside the mask;
- label = ``1 + argmax(CSF, GM, WM)`` inside the mask, 0 outside.

Two sub-commands:

``train``
    Precomputes a bank of augmented volumes on the model grid (RAS, 1.5 mm isotropic,
    percentile 0.5-99.5 of non-zero voxels -> [0, 1]) that simulate real acquisitions:
    rotation up to +-20 deg about all axes, acquisition spacing 0.8-2.5 mm (isotropic or
    anisotropic; slice profile blur, then linear resampling back up to the model grid as
    the inference pipeline does), a field of view 0-40 mm larger than the brain on each
    side, multiplicative bias field, gamma, Gaussian / Rician noise, arbitrary scanner
    scale and offset, left-right mirroring. Labels follow the geometry with
    nearest-neighbour sampling. Then trains a MONAI ``UNet`` on random 64^3 patches
    (batch 2) with ``DiceCELoss`` and Adam (polynomial learning-rate decay over the
    planned iterations or the remaining time, whichever ends first), and writes
    ``model.pt`` (a state dict that loads with ``torch.load(weights_only=True)``),
    ``model.yaml`` (the model card) and ``training_log.json`` into ``--out``.

``data``
    Writes the bundled sample ``samples/t1_sample.nii.gz`` (oblique, anisotropic,
    LPS-stored, intensity-scaled int16, NOT on the training grid), its reference label
    map and the cropped 1 mm T1 + reference labels used by the geometry acceptance test
    under ``tests/data/brain/``.

Reproduce the bundled model (2 CPU threads, 20 minutes wall-clock cap; on a machine
shared with other jobs fewer iterations fit in the cap, see ``training_log.json``)::

    .venv/bin/python scripts/train_demo_brain.py train --seed 0 \
        --out src/medinfer/models/zoo/demo-brain

This script is the only place that reads ``../shared/data``; nothing reads it at run
or test time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

LOG = logging.getLogger("train_demo_brain")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"

#: model input contract (written into the model card)
MODEL_SPACING = 1.5
MODEL_ORIENTATION = "RAS"
NORMALIZATION: dict[str, Any] = {"method": "percentile", "lower": 0.5, "upper": 99.5,
                                 "nonzero": True}
LABELS: dict[int, tuple[str, tuple[int, int, int]]] = {
    0: ("background", (0, 0, 0)),
    1: ("cerebrospinal fluid", (60, 120, 255)),
    2: ("grey matter", (255, 140, 0)),
    3: ("white matter", (240, 240, 80)),
}
#: SNOMED CT codes: CSF 65216001, grey matter 389080000 (gray matter structure),
#: white matter 389079003 (white matter structure) -- used by DICOM SEG writers
SNOMED = {1: "65216001", 2: "389080000", 3: "389079003"}
ARCH_KWARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 4,
    "channels": [16, 32, 64, 128],
    "strides": [2, 2, 2],
    "num_res_units": 0,
}
PATCH = 64


# ----------------------------------------------------------------------------- source
def load_source(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load the MNI152 T1 and build the reference label map.

    Returns
    -------
    t1 : float32 ``(I, J, K)`` = (197, 233, 189), template intensities 0..255.
    labels : uint8 ``(I, J, K)``, values 0 background, 1 CSF, 2 GM, 3 WM.
    affine : float64 (4, 4), voxel -> RAS+ mm (1 mm, RAS).
    """
    t1_img: Any = nib.load(str(data_dir / "mni152_t1_1mm.nii.gz"))
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm_img: Any = nib.load(str(data_dir / "mni152_gm_prob_1mm.nii.gz"))
    wm_img: Any = nib.load(str(data_dir / "mni152_wm_prob_1mm.nii.gz"))
    gm = np.asarray(gm_img.dataobj, dtype=np.float32)
    wm = np.asarray(wm_img.dataobj, dtype=np.float32)
    mask = ndi.binary_fill_holes(t1 > 0)
    csf = np.clip(255.0 - gm - wm, 0.0, 255.0)
    labels = np.where(mask, 1 + np.argmax(np.stack([csf, gm, wm]), axis=0), 0).astype(np.uint8)
    return t1, labels, np.asarray(t1_img.affine, dtype=np.float64)


def crop_to_labels(t1: np.ndarray, labels: np.ndarray, affine: np.ndarray, margin: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop both arrays to the bounding box of ``labels > 0`` plus ``margin`` voxels."""
    idx = np.argwhere(labels > 0)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, labels.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return t1[sl], labels[sl], new_affine


# --------------------------------------------------------------------------- geometry
def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation ``Rz @ Ry @ Rx`` for angles (deg) about the x, y, z (R, A, S) axes."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def resample(src: torch.Tensor, src_affine: np.ndarray, dst_affine: np.ndarray,
             dst_shape: tuple[int, int, int], mode: str = "bilinear") -> torch.Tensor:
    """Sample ``src`` ``(C, I, J, K)`` at the voxel centres of another grid.

    Trilinear (``mode="bilinear"``) or nearest; points outside ``src`` get 0. Both
    affines map voxel indices to RAS+ mm. Returns float32 ``(C, *dst_shape)``.
    """
    m = np.linalg.inv(src_affine) @ dst_affine
    size = np.asarray(src.shape[1:], dtype=np.float64)
    axes = [torch.arange(n, dtype=torch.float32) for n in dst_shape]
    grid = torch.empty((*dst_shape, 3), dtype=torch.float32)
    for a in range(3):  # grid_sample wants (x, y, z) = (K, J, I), normalised to [-1, 1]
        row = m[a] * (2.0 / (size[a] - 1.0))
        c = (axes[0] * float(row[0]))[:, None, None] + (axes[1] * float(row[1]))[None, :, None]
        c = c + (axes[2] * float(row[2]))[None, None, :] + float(row[3] - 1.0)
        grid[..., 2 - a] = c
    out = F.grid_sample(src[None].float(), grid[None], mode=mode, padding_mode="zeros",
                        align_corners=True)
    return out[0]


def normalize_percentile(x: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """Percentile clip over non-zero voxels, then min-max to [0, 1] (float32)."""
    nz = x[x != 0]
    if nz.size == 0:
        return np.zeros_like(x, dtype=np.float32)
    lo, hi = np.percentile(nz, [lower, upper])
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------- augmentation
def augmented_item(t1: torch.Tensor, lab1h: torch.Tensor, affine: np.ndarray,
                   rng: np.random.Generator, clean: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One simulated acquisition brought to the model grid.

    Parameters
    ----------
    t1 : float32 ``(1, I, J, K)`` source T1 on the 1 mm grid ``affine``.
    lab1h : float32 ``(1, I, J, K)`` reference labels (values 0..3) on the same grid.
    rng : random generator (all randomness comes from it).
    clean : no augmentation (RAS, 1 mm acquisition) when True.

    Returns
    -------
    image : float16 ``(I', J', K')`` normalised T1 on a 1.5 mm grid whose axes are the
        rotated acquisition axes (as the inference pipeline keeps obliquity).
    labels : uint8 ``(I', J', K')`` labels on the same grid (nearest).
    """
    shape = np.asarray(t1.shape[1:])
    corners = np.array([[a, b, c] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1)
                        for c in (0, shape[2] - 1)], dtype=np.float64)
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    centre = world.mean(0)
    if clean:
        rot = np.eye(3)
        spacing = np.ones(3)
    else:
        rot = rotation_matrix(rng.uniform(-20, 20, size=3))
        centre = centre + rng.uniform(-5, 5, size=3)
        kind = rng.uniform()
        if kind < 0.25:  # isotropic
            spacing = np.full(3, rng.uniform(0.8, 2.0))
        elif kind < 0.75:  # thick slices along one axis
            spacing = rng.uniform(0.8, 1.3, size=3)
            spacing[rng.integers(3)] = rng.uniform(1.5, 2.5)
        else:  # anything
            spacing = rng.uniform(0.8, 2.5, size=3)
    local = (world - centre) @ rot  # corners in the rotated frame
    lo, hi = local.min(0), local.max(0)
    # 1 mm grid in the rotated frame, then slice-profile blur, then the acquisition grid
    fine_aff = np.eye(4)
    fine_aff[:3, :3] = rot
    fine_aff[:3, 3] = centre + rot @ lo
    fine_shape = tuple(int(n) for n in np.floor(hi - lo).astype(int) + 1)
    fine = resample(t1, affine, fine_aff, fine_shape)[0].numpy()  # type: ignore[arg-type]
    sig = np.sqrt(np.maximum(spacing**2 - 1.0, 0.0)) / 2.355
    if np.any(sig > 0.05):
        fine = ndi.gaussian_filter(fine, sigma=sig, truncate=3.0)
    acq_aff = fine_aff.copy()
    acq_aff[:3, :3] = rot * spacing[None, :]
    acq_shape = tuple(int(n) for n in np.floor((np.asarray(fine_shape) - 1) / spacing) + 1)
    acq = resample(torch.from_numpy(fine)[None], fine_aff, acq_aff, acq_shape)[0].numpy()  # type: ignore[arg-type]

    # a field of view larger than the brain: 0-40 mm of empty space on each side (20 mm
    # when clean), so that the network also learns windows that hold no tissue at all
    pad_mm = np.full((3, 2), 20.0) if clean else rng.uniform(0.0, 40.0, size=(3, 2))
    pad = np.floor(pad_mm / spacing[:, None]).astype(int)
    acq = np.pad(acq, [(int(a), int(b)) for a, b in pad])
    acq_aff[:3, 3] = acq_aff[:3, 3] - acq_aff[:3, :3] @ pad[:, 0]
    acq_shape = acq.shape
    if not clean:
        acq = _intensity_augment(acq, rng)

    model_aff = acq_aff.copy()
    model_aff[:3, :3] = rot * MODEL_SPACING
    model_shape = tuple(
        int(n) for n in np.floor((np.asarray(acq_shape) - 1) * spacing / MODEL_SPACING) + 1
    )
    img = resample(torch.from_numpy(acq)[None], acq_aff, model_aff, model_shape)[0].numpy()  # type: ignore[arg-type]
    lab = resample(lab1h, affine, model_aff, model_shape, mode="nearest")[0].numpy()  # type: ignore[arg-type]
    img = normalize_percentile(img, NORMALIZATION["lower"], NORMALIZATION["upper"])
    lab = np.rint(lab).astype(np.uint8)
    if not clean and rng.uniform() < 0.5:  # the template is symmetric: mirror left-right
        img, lab = img[::-1], lab[::-1]
    return np.ascontiguousarray(img, dtype=np.float16), np.ascontiguousarray(lab)


def _intensity_augment(acq: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bias field, gamma, noise, scanner scale/offset on the acquisition grid (float32)."""
    peak = float(np.percentile(acq[acq > 0], 99.5)) if np.any(acq > 0) else 1.0
    x = acq / peak
    # smooth multiplicative bias field: random 4x4x4 field, trilinear up, exp
    coarse = torch.from_numpy(rng.normal(0.0, rng.uniform(0.0, 0.35), size=(1, 1, 4, 4, 4))
                              .astype(np.float32))
    field = F.interpolate(coarse, size=x.shape, mode="trilinear", align_corners=True)[0, 0]
    x = x * np.exp(field.numpy())
    # gamma
    x = np.clip(x, 0, None) ** float(np.exp(rng.uniform(-0.4, 0.4)))
    # noise: none / Gaussian / Rician (background becomes non-zero for the last two)
    u = rng.uniform()
    sigma = rng.uniform(0.005, 0.06)
    if u < 0.35:
        x = x + rng.normal(0, sigma, size=x.shape).astype(np.float32) * (x > 0)
    elif u < 0.7:
        n1 = rng.normal(0, sigma, size=x.shape).astype(np.float32)
        n2 = rng.normal(0, sigma, size=x.shape).astype(np.float32)
        x = np.sqrt((x + n1) ** 2 + n2**2)
    # arbitrary scanner scale and offset, stored as integers
    scale = float(np.exp(rng.uniform(math.log(60.0), math.log(4000.0))))
    offset = float(rng.uniform(0, 0.3)) * scale if rng.uniform() < 0.4 else 0.0
    x = np.rint(np.clip(x, 0, None) * scale + offset)
    return x.astype(np.float32)


def build_bank(t1: np.ndarray, labels: np.ndarray, affine: np.ndarray, n: int,
               rng: np.random.Generator, deadline: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` augmented (image, labels) pairs on the model grid; item 0 is un-augmented."""
    t1_t = torch.from_numpy(t1)[None]
    lab_t = torch.from_numpy(labels.astype(np.float32))[None]
    bank = []
    for i in range(n):
        bank.append(augmented_item(t1_t, lab_t, affine, rng, clean=(i == 0)))
        LOG.info("bank item %d/%d shape %s", i + 1, n, bank[-1][0].shape)
        if time.time() > deadline:
            LOG.warning("bank time budget spent after %d items", i + 1)
            break
    return bank


# -------------------------------------------------------------------------- training
def make_network() -> torch.nn.Module:
    """The MONAI ``UNet`` named in the model card (``ARCH_KWARGS``)."""
    from monai.networks.nets import UNet

    return UNet(**ARCH_KWARGS)


def random_patch(bank: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator,
                 patch: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``patch``^3 crop (zero-padded where the volume is smaller) of a random item."""
    img, lab = bank[int(rng.integers(len(bank)))]
    pads = [(max(0, patch - s + 0), 0) for s in img.shape]
    if any(p[0] for p in pads):
        pads = [(p // 2, p - p // 2) for p, _ in pads]
        img = np.pad(img, pads)
        lab = np.pad(lab, pads)
    start = [int(rng.integers(0, s - patch + 1)) for s in img.shape]
    sl = tuple(slice(a, a + patch) for a in start)
    return img[sl].astype(np.float32), lab[sl].astype(np.int64)


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t_start = time.time()
    deadline = t_start + (args.minutes * 60.0 if args.minutes > 0 else math.inf)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t1, labels, affine = load_source(Path(args.data))
    t1, labels, affine = crop_to_labels(t1, labels, affine, margin=4)
    LOG.info("source cropped to %s, label counts %s", t1.shape, np.bincount(labels.ravel()))
    bank = build_bank(t1, labels, affine, args.bank, rng,
                      deadline=t_start + args.bank_minutes * 60.0)
    val_rng = np.random.default_rng(args.seed + 1000)
    val = [augmented_item(torch.from_numpy(t1)[None],
                          torch.from_numpy(labels.astype(np.float32))[None], affine, val_rng)
           for _ in range(2)]
    t_bank = time.time() - t_start
    LOG.info("bank of %d items built in %.0f s", len(bank), t_bank)

    from monai.losses import DiceCELoss

    net = make_network()
    n_params = sum(p.numel() for p in net.parameters())
    LOG.info("UNet %s: %d parameters", ARCH_KWARGS["channels"], n_params)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=1e-5)
    net.train()
    running = 0.0
    it = 0
    t_train = time.time()
    train_budget = max(deadline - t_train - 60.0, 1.0)  # keep a minute for validation
    for it in range(1, args.iterations + 1):
        # polynomial decay over the planned iterations, or over the remaining time when
        # --minutes would cut training short (then the run is not bit-reproducible)
        frac = (it - 1) / args.iterations
        if args.minutes > 0:
            frac = max(frac, (time.time() - t_train) / train_budget)
        if frac >= 1.0:
            LOG.warning("time budget of %.1f min spent at iteration %d", args.minutes, it)
            break
        lr = args.lr * min(1.0, it / 30) * (1.0 - frac) ** 0.9
        for g in opt.param_groups:
            g["lr"] = lr
        xs, ys = zip(*(random_patch(bank, rng, args.patch) for _ in range(args.batch)),
                     strict=True)
        x = torch.from_numpy(np.stack(xs)[:, None])
        y = torch.from_numpy(np.stack(ys)[:, None])
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lv = float(loss.detach())
        running = 0.98 * running + 0.02 * lv if it > 1 else lv
        if it % 20 == 0:
            LOG.info("it %d/%d loss %.4f (avg %.4f) lr %.2e elapsed %.0f s", it,
                     args.iterations, lv, running, lr, time.time() - t_start)

    net.eval()
    dices = [evaluate_model_grid(net, img, lab) for img, lab in val]
    LOG.info("validation Dice (model grid) CSF/GM/WM: %s", dices)
    weights = out / "model.pt"
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    tmp = weights.with_name(".model.pt.part")
    torch.save(state, tmp)
    tmp.replace(weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    minutes = (time.time() - t_start) / 60.0
    command = " ".join(["python", "scripts/train_demo_brain.py", *sys.argv[1:]])
    write_card(out / "model.yaml", digest, args, minutes, command, it)
    log = {
        "command": command, "seed": args.seed, "iterations_done": it,
        "iterations_planned": args.iterations, "patch": args.patch, "batch": args.batch,
        "bank_items": len(bank), "bank_seconds": round(t_bank, 1),
        "minutes_total": round(minutes, 2), "threads": args.threads,
        "parameters": n_params, "final_running_loss": round(running, 4),
        "validation_dice_csf_gm_wm": dices, "sha256": digest,
        "torch": torch.__version__,
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    LOG.info("wrote %s (%d bytes), %.1f min in total", weights, weights.stat().st_size, minutes)


@torch.no_grad()
def evaluate_model_grid(net: torch.nn.Module, img: np.ndarray, lab: np.ndarray
                        ) -> list[float]:
    """CSF / GM / WM Dice of ``net`` on one bank-style item (MONAI sliding window)."""
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(img.astype(np.float32))[None, None]
    logits = sliding_window_inference(x, (PATCH,) * 3, 1, net, overlap=0.5, mode="gaussian")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"expected a tensor of logits, got {type(logits).__name__}")
    pred = torch.argmax(logits, 1)[0].numpy()
    out = []
    for k in (1, 2, 3):
        a, b = pred == k, lab == k
        out.append(round(float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1)), 4))
    return out


def write_card(path: Path, digest: str, args: argparse.Namespace, minutes: float,
               command: str, iterations: int) -> None:
    """Write the model card (``model.yaml``) following ``medinfer.models.card.ModelCard``."""
    import yaml

    card = {
        "name": "demo-brain",
        "version": "1.0.0",
        "task": "segmentation",
        "description": (
            "Demo brain tissue segmentation of skull-stripped T1-weighted MRI "
            "into CSF, grey matter and white matter. Trained on a single template (MNI152) "
            "with heavy geometric and intensity augmentation. DEMO ONLY: not a medical "
            "device, not validated on patient data, not for clinical use."
        ),
        "labels": {
            v: ({"name": n, "color": list(c)} | ({"snomed": SNOMED[v]} if v in SNOMED else {}))
            for v, (n, c) in LABELS.items()
        },
        "input": {
            "modality": "MR",
            "channels": 1,
            "orientation": MODEL_ORIENTATION,
            "spacing": [MODEL_SPACING] * 3,
            "normalization": dict(NORMALIZATION),
        },
        "inference": {
            "mode": "sliding_window",
            "patch_size": [PATCH] * 3,
            "overlap": 0.5,
            "blending": "gaussian",
            "sigma_scale": 0.125,
            "tta_axes": [0],
            "batch_size": 1,
        },
        "output": {"activation": "softmax"},
        "weights": {"format": "state_dict", "file": "model.pt", "sha256": digest},
        "architecture": {"network": "UNet", "kwargs": dict(ARCH_KWARGS)},
        "provenance": {
            "training_data": (
                "MNI ICBM152 2009a non-linear symmetric T1 template with its GM/WM "
                "probability maps (McConnell Brain Imaging Centre; as shipped in the "
                "nilearn wheel). Labels: brain mask = T1 > 0 (holes filled); "
                "CSF prob = clip(255 - GM - WM); label = 1 + argmax(CSF, GM, WM) in the mask."
            ),
            "training_script": "scripts/train_demo_brain.py",
            "training_command": command,
            "training_minutes": round(minutes, 1),
            "training_iterations": iterations,
            "training_patch": [args.patch] * 3,
            "training_batch": args.batch,
            "training_hardware": f"CPU, {args.threads} threads",
            "seed": args.seed,
            "augmentation": (
                "rotation +-20 deg (3 axes), acquisition spacing 0.8-2.5 mm iso/anisotropic "
                "with slice-profile blur and linear resampling to the model grid, bias field, "
                "gamma, Gaussian/Rician noise, scanner scale 60-4000 and offset, LR mirror, "
                "field of view 0-40 mm larger than the brain"
            ),
            "intended_use": (
                "Demonstration and testing of medinfer only (bundled sample, geometry "
                "acceptance tests). Not a medical device; not for clinical or research "
                "measurements. Expects a skull-stripped T1-weighted MRI of an adult brain."
            ),
            "evaluation": (
                "tests/test_acceptance_geometry.py: GM and WM Dice >= 0.85 against the "
                "template labels in 7 frames (RAS, LPS, LPI, permuted, oblique 15 deg, "
                "0.9x1.1x2.5 mm, the bundled sample). The only test subject is the training "
                "template itself: no generalisation to patients is claimed."
            ),
        },
        "license": (
            "Apache-2.0 (weights); training data: MNI ICBM152 2009a, free use with "
            "attribution (ICBM152 copyright notice, see DATA_NOTICE.md)"
        ),
    }
    tmp = path.with_name("." + path.name + ".part")
    header = ("# demo-brain model card (written by scripts/train_demo_brain.py).\n"
              "# Intended use: demonstration and testing of medinfer only. Not for clinical "
              "use.\n")
    tmp.write_text(header + yaml.safe_dump(card, sort_keys=False, allow_unicode=True))
    tmp.replace(path)


# ------------------------------------------------------------------------------ data
def lps_reorder(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Store an RAS-ish array in LPS voxel order (flip axes 0 and 1), affine adjusted."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    shape = arr.shape
    flip[0, 3] = shape[0] - 1
    flip[1, 3] = shape[1] - 1
    return np.ascontiguousarray(arr[::-1, ::-1]), affine @ flip


def make_data(args: argparse.Namespace) -> None:
    """Write the bundled sample and the test reference data (see module docstring)."""
    t1, labels, affine = load_source(Path(args.data))
    repo = Path(args.repo)
    tdir = repo / "tests" / "data" / "brain"
    tdir.mkdir(parents=True, exist_ok=True)

    # 1) cropped 1 mm T1 and reference labels for the geometry acceptance test
    ct1, clab, caff = crop_to_labels(t1, labels, affine, margin=3)
    _save(ct1.astype(np.uint8), caff, tdir / "mni152_t1_1mm_crop.nii.gz")
    _save(clab, caff, tdir / "mni152_labels_1mm_crop.nii.gz")

    # 2) the bundled sample: 12 deg about the oblique axis (1, 1, 0.5), 1.2 x 1.2 x 1.5 mm,
    #    LPS storage, x3.7 + 20 int16
    axis = np.array([1.0, 1.0, 0.5])
    axis /= np.linalg.norm(axis)
    theta = np.deg2rad(12.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + math.sin(theta) * k + (1 - math.cos(theta)) * (k @ k)
    spacing = np.array([1.2, 1.2, 1.5])
    shape = np.asarray(ct1.shape)
    centre = caff[:3, :3] @ ((shape - 1) / 2) + caff[:3, 3]
    out_shape = np.ceil(shape * 1.08 / spacing).astype(int)
    s_aff = np.eye(4)
    s_aff[:3, :3] = rot * spacing[None, :]
    s_aff[:3, 3] = centre - s_aff[:3, :3] @ ((out_shape - 1) / 2)
    fine = ndi.gaussian_filter(ct1.astype(np.float32),
                               sigma=np.sqrt(np.maximum(spacing**2 - 1, 0)) / 2.355)
    t = resample(torch.from_numpy(fine)[None], caff, s_aff, tuple(out_shape))[0].numpy()
    lab = resample(torch.from_numpy(clab.astype(np.float32))[None], caff, s_aff,
                   tuple(out_shape), mode="nearest")[0].numpy()
    t = np.rint(t * 3.7 + 20.0).astype(np.int16)
    lab = np.rint(lab).astype(np.uint8)
    t, s_aff_lps = lps_reorder(t, s_aff)
    lab, _ = lps_reorder(lab, s_aff)
    (repo / "samples").mkdir(exist_ok=True)
    _save(t, s_aff_lps, repo / "samples" / "t1_sample.nii.gz")
    _save(lab, s_aff_lps, tdir / "t1_sample_labels.nii.gz")
    for p in sorted(tdir.glob("*.nii.gz")) + [repo / "samples" / "t1_sample.nii.gz"]:
        LOG.info("%s: %d bytes", p, p.stat().st_size)


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    tmp = path.with_name("." + path.name + ".part.nii.gz")
    nib.save(img, str(tmp))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train the demo-brain model")
    tr.add_argument("--data", default=str(DEFAULT_DATA), help="folder with the MNI152 files")
    tr.add_argument("--out", default=str(REPO / "src/medinfer/models/zoo/demo-brain"))
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--minutes", type=float, default=20.0,
                    help="wall-clock cap (0 = none; then fully deterministic)")
    tr.add_argument("--bank-minutes", type=float, default=3.0)
    tr.add_argument("--bank", type=int, default=20, help="augmented volumes to precompute")
    tr.add_argument("--iterations", type=int, default=800)
    tr.add_argument("--patch", type=int, default=PATCH)
    tr.add_argument("--batch", type=int, default=2)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--threads", type=int, default=2)
    tr.add_argument("--log", default=None, help="also log to this file")
    da = sub.add_parser("data", help="write the bundled sample and test reference data")
    da.add_argument("--data", default=str(DEFAULT_DATA))
    da.add_argument("--repo", default=str(REPO))
    args = parser.parse_args(argv)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if getattr(args, "log", None):
        handlers.append(logging.FileHandler(args.log))
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "train":
        train(args)
    else:
        make_data(args)


if __name__ == "__main__":
    main()
