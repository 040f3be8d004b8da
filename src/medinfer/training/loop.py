"""The training loop: seeded, checkpointed, resumable, with early stopping.

Reproducibility: the random state of step ``s`` (case choice, patch position,
augmentation) is derived from ``(seed, s)`` alone, and the network/optimizer state is
checkpointed, so a run killed at any moment (SIGKILL included) and started again with
the same config resumes from ``checkpoints/last.pt`` and produces the same step and
loss sequence as an uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medinfer._atomic import atomic_path, write_text_atomic
from medinfer.errors import ConfigError
from medinfer.training.config import Loss, Schedule, Target, TrainConfig
from medinfer.training.data import (
    LoadedCase,
    find_pairs,
    load_case,
    split_cases,
)

log = logging.getLogger(__name__)

#: called after every step with (step, loss, validation metric or None)
StepCallback = Callable[[int, float, float | None], None]
#: validation hook: (network, step) -> metric (higher is better)
Validator = Callable[[Any, int], float]

_RESUME_KEYS = ("network", "network_kwargs", "patch_size", "seed", "loss", "lr", "batch_size",
                "in_channels", "acquisition",
                "schedule", "normalization", "labels_map", "num_classes")


class EarlyStopping:
    """Stop when the validation metric (higher is better) has not improved by more
    than ``min_delta`` for ``patience`` consecutive validations.

    ``step(metric)`` returns True at the validation where the count of validations
    without improvement reaches ``patience``; the first validation always improves.
    ``patience=None`` never stops.
    """

    def __init__(self, patience: int | None, min_delta: float = 0.0) -> None:
        if patience is not None and patience < 1:
            raise ConfigError(f"patience: {patience} is not allowed; use an integer >= 1")
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best = -math.inf
        self.bad = 0

    def step(self, metric: float) -> bool:
        """Record one validation metric; True when training should stop."""
        if metric > self.best + self.min_delta:
            self.best = float(metric)
            self.bad = 0
        else:
            self.bad += 1
        return self.patience is not None and self.bad >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.bad = int(state["bad"])


def resolve_patience(config: TrainConfig) -> int | None:
    """``config.patience``, else the patience in ``model_card``'s ``training`` section
    (``early_stopping.patience``, ``patience`` or ``early-stopping.patience``), else None."""
    if config.patience is not None:
        return config.patience
    if config.model_card is not None:
        from medinfer.models.card import ModelCard

        card = ModelCard.from_yaml(config.model_card)
        if card.early_stopping_patience is not None:
            return card.early_stopping_patience
        es = card.training.get("early-stopping")  # the UNet3D suite's spelling
        value = es.get("patience") if isinstance(es, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        if value is not None:
            raise ConfigError(f"{config.model_card}: training.early-stopping.patience "
                              f"{value!r} is not allowed; use an integer >= 1")
    return None


_DEFAULT_KWARGS: dict[str, dict[str, Any]] = {
    "UNet": {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 1},
    "BasicUNet": {"features": (16, 16, 32, 64, 128, 16)},
    "SegResNet": {"init_filters": 8},
    "DynUNet": {"kernel_size": [3, 3, 3, 3, 3], "strides": [1, 2, 2, 2, 2],
                "upsample_kernel_size": [2, 2, 2, 2]},
    "SwinUNETR": {"feature_size": 12},
}


def network_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The network's constructor arguments: defaults per class, then the config's."""
    kw: dict[str, Any] = dict(_DEFAULT_KWARGS.get(config.network.value, {}))
    kw.update(config.network_kwargs)
    out_ch = 1 if config.target is Target.HEATMAP else config.n_classes  # one sigmoid logit
    kw.update({"spatial_dims": 3, "in_channels": config.in_channels or 1,
               "out_channels": out_ch})
    if config.network.value == "SwinUNETR":
        kw.pop("img_size", None)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}


def build(config: TrainConfig) -> Any:
    """Build the configured MONAI network (seeded: same weights for the same seed)."""
    import torch

    from medinfer.models.loaders import build_network

    torch.manual_seed(config.seed)
    return build_network(config.network, network_kwargs(config))


def _loss_fn(config: TrainConfig) -> Any:
    from monai.losses import DiceCELoss, DiceFocalLoss

    if config.loss is Loss.DICE_FOCAL:
        return DiceFocalLoss(to_onehot_y=True, softmax=True, lambda_dice=config.dice_weight,
                             lambda_focal=config.ce_weight)
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=config.dice_weight,
                      lambda_ce=config.ce_weight)


def lr_at(config: TrainConfig, step: int, time_frac: float = 0.0) -> float:
    """Learning rate of (0-based) ``step``: cosine annealing or poly (power 0.9) to 0."""
    frac = min(max(step / config.max_steps, time_frac), 1.0)
    if config.schedule is Schedule.POLY:
        return config.lr * (1.0 - frac) ** 0.9
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def train_transforms(config: TrainConfig) -> Any:
    """MONAI dictionary transforms for one training sample (keys ``image``, ``label``).

    Padding to at least the patch, patch sampling with ``foreground_ratio``; with
    ``augment``: affine (rotation +-``rotate_deg`` about all axes, scaling 0.85-1.15),
    anisotropic spacing simulation (``RandSimulateLowResolutiond``), bias field, gamma,
    Gaussian noise, contrast (intensity scaling).
    """
    from monai import transforms as mt

    keys = ["image", "label"]
    ps = list(config.patch_size)
    ratio = config.foreground_ratio
    steps: list[Any] = [
        mt.SpatialPadd(keys, spatial_size=ps),
        mt.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=ps,
                                  pos=ratio, neg=1.0 - ratio, num_samples=1,
                                  allow_smaller=True),
    ]
    if config.augment:
        rad = math.radians(config.rotate_deg)
        steps += [
            mt.RandAffined(keys, prob=0.5, rotate_range=(rad, rad, rad),
                           scale_range=(0.15, 0.15, 0.15), mode=("bilinear", "nearest"),
                           padding_mode="zeros"),
            mt.RandSimulateLowResolutiond(["image"], prob=0.2, zoom_range=(0.5, 1.0)),
            mt.RandBiasFieldd(["image"], prob=0.2, coeff_range=(0.0, 0.1)),
            mt.RandAdjustContrastd(["image"], prob=0.2, gamma=(0.7, 1.5)),
            mt.RandGaussianNoised(["image"], prob=0.2, std=0.05),
            mt.RandScaleIntensityd(["image"], prob=0.2, factors=0.2),
        ]
    return mt.Compose(steps)


def pad_to_multiple(array: np.ndarray, multiple: int) -> np.ndarray:
    """Zero-pad the last three axes at their ends to multiples of ``multiple``."""
    pads = [(0, 0)] * (array.ndim - 3) + [(0, (-s) % multiple) for s in array.shape[-3:]]
    return np.pad(array, pads)


def predict_array(net: Any, image: np.ndarray, config: TrainConfig) -> np.ndarray:
    """Label map ``(I, J, K)`` int64 of a normalised image ``(1, I, J, K)``: padded to
    ``pad_multiple``, MONAI sliding window (Gaussian blending, overlap 0.25), argmax."""
    import torch
    from monai.inferers import sliding_window_inference

    shape = image.shape[-3:]
    dev = next(net.parameters()).device
    x = torch.from_numpy(pad_to_multiple(image, config.pad_multiple)[None]).to(dev)
    roi = [min(p, s) for p, s in zip(config.patch_size, x.shape[-3:], strict=True)]
    was = net.training
    net.eval()
    with torch.no_grad():
        logits = sliding_window_inference(x, roi, 1, net, overlap=0.25, mode="gaussian")
    net.train(was)
    lab = torch.as_tensor(logits).argmax(1)[0].cpu().numpy()
    return np.asarray(lab[: shape[0], : shape[1], : shape[2]], dtype=np.int64)


@dataclass
class TrainResult:
    """Outcome of :func:`train`."""

    out: Path
    steps: int
    stopped_early: bool
    best_metric: float | None
    best_step: int | None
    log: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None
    minutes: float | None = None
    timed_out: bool = False


def _write_logs(out: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(out / "training_log.json", json.dumps(rows, indent=1) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "loss", "lr", "val_metric"],
                       extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    write_text_atomic(out / "training_log.csv", buf.getvalue())


def _save(obj: Any, path: Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, str(tmp))


def load_init_weights(net: Any, path: Path, device: Any) -> None:
    """Load the state dict ``path`` into ``net`` (fine-tuning start) and move it to ``device``.

    Used by the segmentation and the heat-map loops when ``init_weights`` is set and no
    checkpoint is resumed.

    Raises
    ------
    ConfigError
        ``path`` is not a file, or its state dict does not fit the network.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"init_weights: {p} is not a file")
    try:
        net.load_state_dict(torch.load(str(p), map_location="cpu", weights_only=True))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ConfigError(f"init_weights: {p} does not fit the network "
                          f"({str(exc).splitlines()[0]})") from None
    net.to(device)
    log.info("starting from %s", p)


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


#: one training batch: (step, rng of the step) -> (input, target) torch tensors on the device;
#: input float32 ``(N, C, I, J, K)`` on the model grid (axes of ``cfg.orientation``, voxel
#: size ``cfg.spacing`` mm), target ``(N, 1, I, J, K)`` (int64 labels, or float32 heat map);
#: it seeds whatever else it draws from (augmentation, torch) from that rng
BatchFn = Callable[[int, np.random.Generator], tuple[Any, Any]]


def run_steps(cfg: TrainConfig, net: Any, loss_fn: Any, *, out: Path, core: dict[str, Any],
              device: Any, make_batch: BatchFn, validate: Validator, resume: bool,
              callback: StepCallback | None) -> TrainResult:
    """The step loop of both trainers (segmentation and heat map), from start or resumed.

    AdamW, the learning-rate schedule (:func:`lr_at`, by steps or by the wall-clock budget),
    float16 autocast + gradient scaling on CUDA, validation every ``val_every`` steps with
    ``best.pt``, early stopping, ``last.pt`` every ``checkpoint_every`` steps (network,
    optimizer, scaler, early stopping, log, elapsed time and ``core``: the settings a
    resumed run must share), CSV/JSON logs and TensorBoard. Step ``s`` draws only from
    ``numpy.random.default_rng([cfg.seed, s])``, so a resumed run repeats an uninterrupted
    one. ``init_weights`` is loaded when nothing is resumed.

    Returns
    -------
    TrainResult
        ``minutes`` = wall-clock minutes of the loop, over all resumed runs.

    Raises
    ------
    ConfigError
        ``last.pt`` of another ``core``; unusable ``init_weights``.
    """
    import torch

    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stopper = EarlyStopping(resolve_patience(cfg), cfg.min_delta)
    ckpt_dir = out / "checkpoints"
    rows: list[dict[str, Any]] = []
    start = 0
    best_metric: float | None = None
    best_step: int | None = None
    resumed_from = None
    elapsed_before = 0.0
    last = ckpt_dir / "last.pt"
    if resume and last.is_file():
        state = torch.load(str(last), map_location="cpu", weights_only=True)
        if state.get("core") != json.loads(json.dumps(core)):
            raise ConfigError(f"{last}: checkpoint of a different configuration; use another "
                              "out folder or start fresh (--no-resume)")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if amp and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        stopper.load_state_dict(state["early_stopping"])
        rows = list(state["log"])
        start = int(state["step"])
        best_metric, best_step = state["best_metric"], state["best_step"]
        elapsed_before = float(state.get("elapsed_s", 0.0))
        resumed_from = start
        log.info("resuming %s at step %d", out, start)
    elif cfg.init_weights is not None:
        load_init_weights(net, cfg.init_weights, device)
    stopped = bool(rows and rows[-1].get("stop"))
    if stopped:
        log.info("run in %s already finished (early stopping at step %d)", out, start)
    tb = _tensorboard(out)
    timed_out = False
    step = start
    net.train()
    t0 = time.monotonic()
    while step < cfg.max_steps and not stopped and not timed_out:
        x, y = make_batch(step, np.random.default_rng([cfg.seed, step]))
        time_frac = 0.0
        if cfg.time_schedule and cfg.max_minutes is not None:
            time_frac = (elapsed_before + time.monotonic() - t0) / (60.0 * cfg.max_minutes)
        lr = lr_at(cfg, step, time_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = loss_fn(net(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        step += 1
        row: dict[str, Any] = {"step": step, "loss": float(loss.detach()), "lr": lr,
                               "val_metric": None}
        elapsed = elapsed_before + time.monotonic() - t0
        if cfg.max_minutes is not None and elapsed > 60.0 * cfg.max_minutes:
            timed_out = True
            log.info("wall-clock budget of %.1f min reached at step %d", cfg.max_minutes, step)
        if step % cfg.val_every == 0 or step == cfg.max_steps or timed_out:
            metric = float(validate(net, step))
            row["val_metric"] = metric
            if best_metric is None or metric > best_metric:
                best_metric, best_step = metric, step
                _save({"step": step, "model": net.state_dict(), "metric": metric},
                      ckpt_dir / "best.pt")
            if stopper.step(metric):
                stopped = True
                row["stop"] = True
                log.info("early stopping at step %d (patience %s)", step, stopper.patience)
        rows.append(row)
        if tb is not None:
            tb.add_scalar("loss", row["loss"], step)
            if row["val_metric"] is not None:
                tb.add_scalar("val_metric", row["val_metric"], step)
        if callback is not None:
            callback(step, row["loss"], row["val_metric"])
        if step % cfg.checkpoint_every == 0 or stopped or timed_out or step == cfg.max_steps:
            _save({"step": step, "model": net.state_dict(), "optimizer": opt.state_dict(),
                   "early_stopping": stopper.state_dict(), "log": rows, "core": core,
                   "scaler": scaler.state_dict() if amp else {},
                   "best_metric": best_metric, "best_step": best_step,
                   "elapsed_s": elapsed}, last)
            _write_logs(out, rows)
    if tb is not None:
        tb.close()
    _write_logs(out, rows)
    minutes = (elapsed_before + time.monotonic() - t0) / 60.0
    log.info("trained %d steps in %.1f min (this run: %d steps)", step, minutes, step - start)
    return TrainResult(out, step, stopped, best_metric, best_step, rows, resumed_from,
                       minutes=minutes, timed_out=timed_out)


def load_best(net: Any, out: Path) -> None:
    """Load ``<out>/checkpoints/best.pt`` into ``net`` when there is one (before export)."""
    import torch

    best = out / "checkpoints" / "best.pt"
    if best.is_file():
        net.load_state_dict(torch.load(str(best), map_location="cpu",
                                       weights_only=True)["model"])


def train(config: TrainConfig | dict[str, Any], *, resume: bool = True,
          validator: Validator | None = None, callback: StepCallback | None = None,
          export: bool = True) -> TrainResult:
    """Train a segmentation network; the output folder becomes a medinfer model folder.

    With ``target: heatmap`` the heat-map trainer
    :func:`medinfer.training.heatmap.train_heatmap` runs instead (same checkpoints,
    resumption, early stopping, logs and export; a detection model folder).

    Parameters
    ----------
    config : :class:`TrainConfig` or a mapping of its fields.
    resume : continue from ``<out>/checkpoints/last.pt`` when present (the checkpoint's
        core settings must equal the config's).
    validator : optional ``(network, step) -> metric`` replacing the default validation
        (mean foreground Dice of the validation cases).
    callback : called after every step with ``(step, loss, metric or None)``.
    export : write the model folder (``model.yaml``, state dict, TorchScript, ONNX) and
        figures at the end.

    Returns
    -------
    TrainResult

    Raises
    ------
    ConfigError
        Missing/invalid settings, data that cannot be paired, checkpoint of another config.
    GeometryError
        A label map not on its image's world grid.
    """
    import torch

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_mapping(config)
    if cfg.out is None:
        raise ConfigError("out: an output folder is required")
    if cfg.target is Target.HEATMAP:
        from medinfer.training.heatmap import train_heatmap

        return train_heatmap(cfg, resume=resume, validator=validator, callback=callback,
                             export=export)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.num_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)

    pairs = find_pairs(cfg.images, cfg.labels, cfg.cases)
    by_id = {p.case: p for p in pairs}
    if cfg.labels_map is None and cfg.num_classes is None:
        cfg = cfg.model_copy(update={"num_classes": max(2, _max_label(pairs) + 1)})
    if cfg.in_channels is None:
        cfg = cfg.model_copy(update={"in_channels": len(pairs[0].images)})
    elif cfg.in_channels != len(pairs[0].images):
        raise ConfigError(f"in_channels: {cfg.in_channels}, but the cases have "
                          f"{len(pairs[0].images)} channel file(s) each")
    train_ids, val_ids = split_cases(list(by_id), val_cases=cfg.val_cases, folds=cfg.folds,
                                     fold=cfg.fold, seed=cfg.seed)
    write_text_atomic(out / "split.json", json.dumps(
        {"train": train_ids, "validation": val_ids, "seed": cfg.seed}, indent=1) + "\n")
    write_text_atomic(out / "train_config.json", json.dumps(cfg.to_yaml_dict(), indent=1) + "\n")
    cache: dict[str, LoadedCase] = {}

    def get(case: str) -> LoadedCase:
        if case not in cache:
            cache[case] = load_case(by_id[case], orientation=cfg.orientation,
                                    spacing=cfg.spacing, normalization=cfg.normalization,
                                    n_classes=cfg.n_classes)
        return cache[case]

    t_data = time.monotonic()
    banks: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    if cfg.acquisition is not None:  # simulated acquisitions, seeded per (seed, case, item)
        banks = {c: _bank(by_id[c], cfg, train_ids.index(c)) for c in train_ids}
        log.info("acquisition banks of %d case(s) built in %.1f s", len(banks),
                 time.monotonic() - t_data)
    t_loop = time.monotonic()

    from medinfer.models.loaders import resolve_device

    device = resolve_device(cfg.device)
    net = build(cfg).to(device)
    xforms = train_transforms(cfg)

    def make_batch(step: int, rng: np.random.Generator) -> tuple[Any, Any]:
        xforms.set_random_state(seed=int(rng.integers(2**31)))
        torch.manual_seed(int(rng.integers(2**31)))
        imgs, labs = [], []
        for _ in range(cfg.batch_size):
            case_id = train_ids[int(rng.integers(len(train_ids)))]
            if banks:
                bank = banks[case_id]
                b_img, b_lab = bank[int(rng.integers(len(bank)))]
                data = {"image": b_img.astype(np.float32), "label": b_lab.astype(np.float32)}
            else:
                c = get(case_id)
                data = {"image": c.image, "label": c.label.astype(np.float32)}
            sample = xforms(data)
            sample = sample[0] if isinstance(sample, list) else sample
            imgs.append(torch.as_tensor(np.asarray(sample["image"])))
            labs.append(torch.as_tensor(np.asarray(sample["label"])).round())
        return torch.stack(imgs).float().to(device), torch.stack(labs).long().to(device)

    def validate(net: Any, step: int) -> float:
        if validator is not None:
            return float(validator(net, step))
        return float(np.mean([mean_dice_case(net, get(v), cfg) for v in val_ids]))

    core = {k: cfg.to_yaml_dict()[k] for k in _RESUME_KEYS}
    result = run_steps(cfg, net, _loss_fn(cfg), out=out, core=core, device=device,
                       make_batch=make_batch, validate=validate, resume=resume,
                       callback=callback)
    # minutes: the loop over all runs plus this run's data preparation (acquisition banks)
    result.minutes = (result.minutes or 0.0) + (t_loop - t_data) / 60.0
    if export:
        from medinfer.training.export import export_model_folder

        load_best(net, out)
        model_dir = Path(cfg.export_dir) if cfg.export_dir is not None else out
        export_model_folder(net, cfg, model_dir, result=result)
        from medinfer.training.evaluate import evaluate_model
        from medinfer.training.figures import CURVES_PNG, training_curves

        training_curves(result.log, out / CURVES_PNG)
        # the suite's figures and metric tables for the validation cases
        val_list = out / "validation_cases.json"
        write_text_atomic(val_list, json.dumps(
            [{"case": c, "image": str(Path(by_id[c].image).resolve()),
              "channels": [str(Path(p).resolve()) for p in by_id[c].channels],
              "label": str(Path(by_id[c].label).resolve())} for c in val_ids], indent=1) + "\n")
        evaluate_model(model_dir, out / "evaluation", cases=val_list, device=cfg.device)
    return result


def _bank(pair: Any, cfg: TrainConfig, index: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The simulated-acquisition bank of one training case (config ``acquisition``)."""
    from medinfer.training.acquisition import build_bank
    from medinfer.training.data import load_source_case

    if cfg.acquisition is None:
        raise ConfigError("acquisition: not configured")
    img, lab = load_source_case(pair)
    values = np.unique(np.rint(np.asarray(lab.array)))
    bad = values[(values < 0) | (values >= cfg.n_classes)]
    if bad.size:
        raise ConfigError(f"case {pair.case}: label values {bad[:10].tolist()} outside "
                          f"0..{cfg.n_classes - 1} (labels_map / num_classes)")
    lab = lab.with_array(np.rint(np.asarray(lab.array)).astype(np.int16))
    return build_bank(img, lab, cfg.acquisition, seed=cfg.seed, case_index=index,
                      orientation=cfg.orientation, spacing=cfg.spacing,
                      normalization=cfg.normalization)


def _max_label(pairs: list[Any]) -> int:
    """Largest label value over the label maps of ``pairs`` (for ``num_classes``)."""
    from medinfer.io import load

    top = 0
    for p in pairs:
        arr = np.asarray(load(p.label).array)
        top = max(top, int(np.rint(arr.max())) if arr.size else 0)
    if top > 255:
        raise ConfigError(f"labels: label value {top} in the data; at most 255 classes "
                          "(give labels_map)")
    return top


def mean_dice_case(net: Any, case: LoadedCase, config: TrainConfig) -> float:
    """Mean foreground Dice of the network's label map for one loaded case."""
    from medinfer.training.metrics import mean_foreground_dice

    pred = predict_array(net, case.image, config)
    return mean_foreground_dice(pred, case.label[0], config.n_classes)
