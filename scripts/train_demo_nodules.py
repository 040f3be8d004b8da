#!/usr/bin/env python
"""Train the bundled ``demo-nodules`` heat-map model on synthetic lesions in the head CT.

The model detects **synthetic lesions only** (see ``medinfer.training.nodules_synth`` for the
lesion model); it has no clinical meaning.

Each training sample is made in two steps, as the inference engine will see a scan:

1. a random *source* grid (any orientation, anisotropic spacing 0.6-2 mm) around a patch of
   the head CT with 0-4 inserted lesions is rendered (int16 HU, noise sigma 3-10 HU);
2. it is resampled trilinearly onto the *model* grid patch (1.5 mm isotropic, 32^3 voxels,
   axis-aligned RAS half of the time, randomly rotated otherwise) and windowed
   (``ct_window`` -20..180 HU -> [0, 1]).

The target is the lesion occupancy fraction on the model grid (a soft mask in [0, 1]), so the
sigmoid output is a heat map whose 0.5 level set is the lesion surface and whose sum times
the voxel volume is the lesion volume. Loss: binary cross-entropy with soft targets plus
soft Dice. Network: MONAI ``UNet`` (channels 8, 16, 32, 64; strides 2, 2, 2; one residual
unit; batch normalisation), about 0.6 MB.

Usage: the bundled weights came from three runs on 2 shared CPU cores (20 + 12 + 10 min):
from scratch, then fine-tuning with hard negatives (patches on bright atlas structures such
as calcifications, which look like lesions), then also with more small lesions::

    S=scripts/train_demo_nodules.py; CT=/work/shared/data/ct_head_brain_atlas_1mm.nii.gz
    OUT=src/medinfer/models/zoo/demo-nodules
    .venv/bin/python $S --ct $CT --out $OUT --minutes 20
    .venv/bin/python $S --ct $CT --out $OUT --minutes 12 --resume --hard-negatives 0.35 \
        --lr 1e-3 --seed 7
    .venv/bin/python $S --ct $CT --out $OUT --minutes 10 --resume --hard-negatives 0.35 \
        --small-lesions 0.5 --lr 7e-4 --seed 11
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from medinfer.training.nodules_synth import (
    LesionAtlas,
    grid_points,
    lesion_fraction,
    random_grid,
    random_rotation,
    render_scan,
)

LOG = logging.getLogger("train_demo_nodules")

MODEL_SPACING = 1.5
PATCH = 32
WINDOW = (-20.0, 180.0)
#: MONAI UNet keyword arguments (also written into model.yaml)
#: batch normalisation (running statistics at inference) so that the output does not depend
#: on the window / volume size the way instance normalisation would
UNET_KWARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1,
               "channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1,
               "norm": "batch"}


def build_network() -> torch.nn.Module:
    """The demo-nodules network (MONAI UNet, 1 input channel, 1 output logit)."""
    from monai.networks.nets import UNet

    return UNet(**UNET_KWARGS)


def window(hu: np.ndarray) -> np.ndarray:
    """``ct_window`` normalisation: clip to WINDOW and scale to [0, 1]."""
    lo, hi = WINDOW
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


_BRIGHT: dict[int, np.ndarray] = {}


def bright_structures(atlas: LesionAtlas) -> np.ndarray:
    """RAS+ mm of atlas voxels brighter than 70 HU (calcifications, vessels...): lesion-like
    anatomy that must be learned as negative (hard negatives)."""
    key = id(atlas)
    if key not in _BRIGHT:
        idx = np.argwhere((atlas.array > 70.0) & (atlas.array < 400.0))
        _BRIGHT[key] = atlas.ct.voxel_to_world(idx)
    return _BRIGHT[key]


def make_sample(atlas: LesionAtlas, rng: np.random.Generator,
                hard_negative: float = 0.0,
                small_lesions: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One (input, target) pair on a 32^3 model-grid patch, float32 each.

    With probability ``hard_negative`` the patch is centred (+-8 mm) on a bright atlas
    structure instead of a random deep tissue point; with probability ``small_lesions`` the
    lesions of the patch are drawn from 4-12 mm instead of 4-25 mm (more small examples).
    """
    if hard_negative > 0 and rng.random() < hard_negative:
        bright = bright_structures(atlas)
        centre = bright[rng.integers(len(bright))] + rng.uniform(-8.0, 8.0, size=3)
    else:
        centre = atlas._cand_world[rng.integers(len(atlas._cand_world))]
    u = rng.random()
    n = 0 if u < 0.15 else int(rng.integers(1, 5))
    small = small_lesions > 0 and rng.random() < small_lesions
    lesions = atlas.sample_lesions(rng, n, region=(centre, 16.0),
                                   diameter_range=(4.0, 12.0) if small else (4.0, 25.0))
    # model grid patch
    rot_m = random_rotation(rng) if rng.random() < 0.5 else np.eye(3)
    ext = PATCH * MODEL_SPACING
    aff_m = np.eye(4)
    aff_m[:3, :3] = rot_m * MODEL_SPACING
    half = (PATCH - 1) / 2.0
    aff_m[:3, 3] = centre - aff_m[:3, :3] @ np.full(3, half)
    # source grid covering the patch box
    rot_s = random_rotation(rng)
    extent = np.abs(rot_s.T @ rot_m) @ np.full(3, ext) + 8.0
    aff_s, shape_s = random_grid(rng, centre, extent, (0.6, 2.0), rotation=rot_s)
    scan = render_scan(atlas, lesions, aff_s, shape_s, rng)
    # resample source -> model patch (trilinear), as the engine does
    pts = grid_points(aff_m, (PATCH,) * 3)
    inv = np.linalg.inv(aff_s)
    vox = pts @ inv[:3, :3].T + inv[:3, 3]
    img = ndimage.map_coordinates(scan.image.array[0].astype(np.float32), np.moveaxis(vox, -1, 0),
                                  order=1, mode="nearest")
    target = np.zeros((PATCH,) * 3, dtype=np.float32)
    for les in lesions:
        res = lesion_fraction(les, aff_m, (PATCH,) * 3)
        if res is not None:
            sl, f = res
            target[sl] = np.maximum(target[sl], f)
    return window(img), target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ct", type=Path, required=True, help="head CT atlas NIfTI")
    ap.add_argument("--out", type=Path, required=True, help="model folder to write model.pt into")
    ap.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--buffer", type=int, default=160, help="replay buffer size (samples)")
    ap.add_argument("--new-per-step", type=int, default=1, help="fresh samples per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=20261122)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="start from OUT/model.pt")
    ap.add_argument("--hard-negatives", type=float, default=0.0,
                    help="fraction of patches centred on bright (> 70 HU) atlas structures")
    ap.add_argument("--small-lesions", type=float, default=0.0,
                    help="fraction of patches whose lesions are 4-12 mm")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    atlas = LesionAtlas.from_file(args.ct)
    net = build_network()
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "model.pt"
    if args.resume and ckpt.exists():
        net.load_state_dict(torch.load(ckpt, weights_only=True))
    nparam = sum(p.numel() for p in net.parameters())
    LOG.info("parameters: %d (%.2f MB float32)", nparam, nparam * 4 / 1e6)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-5)
    buffer: list[tuple[np.ndarray, np.ndarray]] = []
    t0 = time.time()
    budget = args.minutes * 60.0
    while len(buffer) < args.batch * 4:
        buffer.append(make_sample(atlas, rng, args.hard_negatives, args.small_lesions))
    LOG.info("initial buffer %d in %.1f s", len(buffer), time.time() - t0)
    step = 0
    last_save = time.time()
    losses: list[float] = []
    while time.time() - t0 < budget:
        for _ in range(args.new_per_step):
            s = make_sample(atlas, rng, args.hard_negatives, args.small_lesions)
            if len(buffer) < args.buffer:
                buffer.append(s)
            else:
                buffer[int(rng.integers(len(buffer)))] = s
        idx = rng.choice(len(buffer), size=args.batch, replace=False)
        xs, ys = [], []
        for i in idx:
            x, y = buffer[int(i)]
            for ax in range(3):  # flips (the task is mirror-symmetric)
                if rng.random() < 0.5:
                    x, y = np.flip(x, ax), np.flip(y, ax)
            xs.append(x.copy())
            ys.append(y.copy())
        xt = torch.from_numpy(np.stack(xs)[:, None])
        yt = torch.from_numpy(np.stack(ys)[:, None])
        frac = min(1.0, (time.time() - t0) / budget)
        for g in opt.param_groups:  # cosine decay
            g["lr"] = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        net.train()
        logits = net(xt)
        prob = torch.sigmoid(logits)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt)
        inter = (prob * yt).sum()
        dice = 1.0 - (2 * inter + 1.0) / (prob.sum() + yt.sum() + 1.0)
        loss = bce * 10.0 + dice
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 20 == 0:
            LOG.info("step %d  t=%.0fs  loss %.4f  (bce %.4f dice %.3f)", step,
                     time.time() - t0, np.mean(losses[-20:]), float(bce), float(dice))
        if time.time() - last_save > 120:
            torch.save(net.state_dict(), ckpt)
            last_save = time.time()
    torch.save(net.state_dict(), ckpt)
    info = {"steps": step, "minutes": (time.time() - t0) / 60.0, "seed": args.seed,
            "resume": bool(args.resume), "hard_negatives": args.hard_negatives, "lr": args.lr,
            "small_lesions": args.small_lesions,
            "final_loss": float(np.mean(losses[-50:])) if losses else None}
    (args.out / "training_log.json").write_text(json.dumps(info, indent=2) + "\n")
    LOG.info("done: %s", info)


if __name__ == "__main__":
    main()
