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


def verify_exports(net: Any, ts_bytes: bytes, onnx_bytes: bytes,
                   shapes: list[tuple[int, ...]]) -> dict[str, float]:
    """Largest |logit difference| of TorchScript and ONNX to ``net`` on random inputs
    ``(1, C, *shape)`` (seeded); raises :class:`ModelError` above ``EXPORT_ATOL``."""
    import onnxruntime as ort
    import torch

    net.eval()
    ts = torch.jit.load(io.BytesIO(ts_bytes), map_location="cpu")
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    worst = {"torchscript": 0.0, "onnx": 0.0}
    in_ch = int(sess.get_inputs()[0].shape[1])
    for shape in shapes:
        x = torch.randn((1, in_ch, *shape), generator=gen)
        with torch.no_grad():
            ref = net(x).numpy()
            t = ts(x).numpy()
        o = sess.run(None, {"input": x.numpy()})[0]
        worst["torchscript"] = max(worst["torchscript"], float(np.abs(t - ref).max()))
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
        "input": {"channels": 1, "orientation": config.orientation,
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
    return card


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
    x = torch.zeros((1, 1, *ps))
    ts_buf = io.BytesIO()
    torch.jit.save(torch.jit.script(net), ts_buf)
    onnx_bytes = _onnx_bytes(net, x)
    m = config.pad_multiple
    other = tuple(int(s + m) for s in ps[::-1])
    diffs = verify_exports(net, ts_buf.getvalue(), onnx_bytes, [ps, other])
    metrics = {"export_max_abs_diff": diffs}
    if result is not None:
        metrics.update({"best_validation_metric": result.best_metric,
                        "best_step": result.best_step, "steps": result.steps,
                        "stopped_early": result.stopped_early})
    split = out / "split.json"
    provenance = {
        "training_data": {"images": str(config.images) if config.images else None,
                          "labels": str(config.labels) if config.labels else None,
                          "cases": str(config.cases) if config.cases else None,
                          "split": json.loads(split.read_text()) if split.is_file() else None},
        "training_config": config.to_yaml_dict(),
        "training_metrics": metrics,
        "training_command": command or shlex.join(["medinfer", *sys.argv[1:]])
        if Path(sys.argv[0]).name == "medinfer" else (command or shlex.join(sys.argv)),
        "exports": {"torchscript": "model.ts", "onnx": "model.onnx"},
    }
    card = build_card(config, network_kwargs(config), hashlib.sha256(sd_bytes).hexdigest(),
                      provenance, resolve_patience(config))
    ModelCard.from_dict(card, str(out / "model.yaml"))
    write_bytes_atomic(out / "model.pt", sd_bytes)
    write_bytes_atomic(out / "model.ts", ts_buf.getvalue())
    write_bytes_atomic(out / "model.onnx", onnx_bytes)
    text = "# written by medinfer.training.export_model_folder\n" + yaml.safe_dump(
        card, sort_keys=False)
    return write_text_atomic(out / "model.yaml", text)
