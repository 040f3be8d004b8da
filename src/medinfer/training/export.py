"""Export a trained network as a medinfer model folder.

The folder holds ``model.yaml`` (labels, input contract, inference defaults,
provenance with data, config, metrics and the training command, the ``training``
section with the early-stopping patience), the state dict ``model.pt`` (the card's
weights), TorchScript ``model.ts`` and ONNX ``model.onnx`` alongside; both are checked to
give the state-dict network's logits within ``EXPORT_ATOL`` before anything is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from medinfer._atomic import write_bytes_atomic, write_text_atomic
from medinfer.errors import ModelError
from medinfer.training.config import TrainConfig

#: largest allowed |difference| of exported logits to the state-dict network's
EXPORT_ATOL = 1e-4


def _onnx_bytes(net: Any, x: Any) -> bytes:
    import tempfile

    import torch

    axes = {0: "n", 2: "i", 3: "j", 4: "k"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], opset_version=17,
                          dynamic_axes={"input": axes, "logits": axes})
        return path.read_bytes()


def verify_exports(net: Any, ts_bytes: bytes | None, onnx_bytes: bytes | None,
                   shapes: list[tuple[int, ...]], in_channels: int = 1) -> dict[str, float]:
    """Largest |logit difference| of TorchScript and ONNX (those given) to ``net`` on
    random inputs ``(1, in_channels, *shape)`` (seeded); raises :class:`ModelError` above
    ``EXPORT_ATOL``."""
    import torch

    net.eval()
    ts = torch.jit.load(io.BytesIO(ts_bytes), map_location="cpu") if ts_bytes else None
    sess = None
    if onnx_bytes is not None:
        import onnxruntime as ort

        sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    worst = {k: 0.0 for k, v in (("torchscript", ts), ("onnx", sess)) if v is not None}
    for shape in shapes:
        x = torch.randn((1, in_channels, *shape), generator=gen)
        with torch.no_grad():
            ref = net(x).numpy()
            if ts is not None:
                t = ts(x).numpy()
                worst["torchscript"] = max(worst["torchscript"], float(np.abs(t - ref).max()))
        if sess is not None:
            o = sess.run(None, {"input": x.numpy()})[0]
            worst["onnx"] = max(worst["onnx"], float(np.abs(o - ref).max()))
    for fmt, err in worst.items():
        if not err <= EXPORT_ATOL:
            raise ModelError(f"{fmt} export differs from the state-dict network by {err:.3g} "
                             f"(accepted <= {EXPORT_ATOL})")
    return worst


def build_card(config: TrainConfig, arch_kwargs: dict[str, Any], sha256: str,
               provenance: dict[str, Any], patience: int | None) -> dict[str, Any]:
    """The ``model.yaml`` mapping of a trained network (validated by ``ModelCard``)."""
    rng = np.random.default_rng(len(config.class_names))
    labels: dict[int, Any] = {}
    for value, name in config.class_names.items():
        color = [0, 0, 0] if value == 0 else [int(v) for v in rng.integers(40, 256, 3)]
        labels[int(value)] = {"name": name, "color": color}
    card: dict[str, Any] = {
        "name": config.name,
        "version": "1.0.0",
        "task": "segmentation",
        "description": f"{config.network.value} trained with medinfer train.",
        "labels": labels,
        "input": {"channels": config.in_channels or 1, "orientation": config.orientation,
                  "spacing": list(config.spacing) if config.spacing else None,
                  "normalization": dict(config.normalization)},
        "inference": {"mode": "sliding_window", "patch_size": list(config.patch_size),
                      "overlap": 0.5, "blending": "gaussian", "batch_size": 1},
        "output": {"activation": "softmax"},
        "weights": {"format": "state_dict", "file": "model.pt", "sha256": sha256},
        "architecture": {"network": config.network.value, "kwargs": arch_kwargs},
        "provenance": provenance,
        "training": {"early_stopping": {"patience": patience}} if patience else {},
    }
    card["input"] = {k: v for k, v in card["input"].items() if v is not None}
    if config.target.value == "heatmap":  # one sigmoid channel: a detection model
        card["task"] = "detection"
        card["output"] = {"activation": "sigmoid", "threshold": 0.5}
    return _merge(card, config.card)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in (mappings recursively, other values replaced)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def export_model_folder(net: Any, config: TrainConfig, out: str | Path, *,
                        result: Any = None, command: str | None = None) -> Path:
    """Write ``model.yaml``, ``model.pt``, ``model.ts``, ``model.onnx`` into ``out``.

    Parameters
    ----------
    net : the trained network (its current weights are exported).
    config : the training configuration (labels, grid, normalisation, patch).
    out : the model folder (created).
    result : optional :class:`~medinfer.training.loop.TrainResult` for the provenance.
    command : the training command line (default: this process's ``sys.argv``).

    Returns
    -------
    Path of ``model.yaml``.

    Raises
    ------
    ModelError
        An export whose outputs differ from the network's by more than ``EXPORT_ATOL``,
        or a card that does not validate.
    """
    import torch
    import yaml

    from medinfer.models.card import ModelCard
    from medinfer.training.loop import network_kwargs, resolve_patience

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    net = net.cpu().eval()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    sd_bytes = buf.getvalue()
    ps = tuple(config.patch_size)
    in_ch = config.in_channels or 1
    x = torch.zeros((1, in_ch, *ps))
    formats = {f.value for f in config.export_formats}
    ts_bytes: bytes | None = None
    if "torchscript" in formats:
        ts_buf = io.BytesIO()
        torch.jit.save(torch.jit.script(net), ts_buf)
        ts_bytes = ts_buf.getvalue()
    onnx_bytes = _onnx_bytes(net, x) if "onnx" in formats else None
    m = config.pad_multiple
    other = tuple(int(s + m) for s in ps[::-1])
    diffs = verify_exports(net, ts_bytes, onnx_bytes, [ps, other], in_ch)
    metrics: dict[str, Any] = {"export_max_abs_diff": diffs}
    if result is not None:
        metrics.update({"best_validation_metric": result.best_metric,
                        "best_step": result.best_step, "steps": result.steps,
                        "stopped_early": result.stopped_early})
        if getattr(result, "minutes", None) is not None:
            metrics["minutes"] = round(float(result.minutes), 1)
            metrics["wall_clock_budget_reached"] = bool(getattr(result, "timed_out", False))
    extra: dict[str, Any] = {}
    if result is not None and getattr(result, "minutes", None) is not None:
        extra = {"training_minutes": round(float(result.minutes), 1),
                 "training_steps": int(result.steps),
                 "training_hardware": f"{config.device} ({config.num_threads} torch "
                                      "thread(s) on CPU)" if config.device != "cuda"
                 else "cuda"}
    split = out / "split.json"
    if not split.is_file() and config.out is not None:
        split = Path(config.out) / "split.json"
    provenance = {
        "training_data": {"images": str(config.images) if config.images else None,
                          "labels": str(config.labels) if config.labels else None,
                          "cases": str(config.cases) if config.cases else None,
                          "split": json.loads(split.read_text()) if split.is_file() else None},
        "training_config": config.to_yaml_dict(),
        "training_metrics": metrics,
        "training_command": command or shlex.join(["medinfer", *sys.argv[1:]])
        if Path(sys.argv[0]).name == "medinfer" else (command or shlex.join(sys.argv)),
        **extra,
        "exports": {k: v for k, v in (("torchscript", "model.ts"), ("onnx", "model.onnx"))
                    if k in formats},
    }
    card = build_card(config, network_kwargs(config), hashlib.sha256(sd_bytes).hexdigest(),
                      provenance, resolve_patience(config))
    ModelCard.from_dict(card, str(out / "model.yaml"))
    write_bytes_atomic(out / "model.pt", sd_bytes)
    if ts_bytes is not None:
        write_bytes_atomic(out / "model.ts", ts_bytes)
    if onnx_bytes is not None:
        write_bytes_atomic(out / "model.onnx", onnx_bytes)
    text = "# written by medinfer.training.export_model_folder\n" + yaml.safe_dump(
        card, sort_keys=False)
    return write_text_atomic(out / "model.yaml", text)
