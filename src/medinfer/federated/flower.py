"""Federated *evaluation* of a model across sites on Flower (``flwr``; extra ``federated``).

Each site runs a Flower ``ClientApp`` on its own labelled cases: the model predicts every
case (any model :func:`medinfer.federated.analyzer.open_node_model` opens), and the site
returns per-label Dice and HD95 (mm) means and its case count as a ``MetricRecord`` -
numbers only, never images. The ``ServerApp`` sends one evaluation message to every site,
aggregates the replies (case-weighted means: ``sum_s n_s * mean_s / sum_s n_s``, which is
the mean over all cases of all sites) and writes ``evaluation.json`` and ``sites.csv``.

Metrics per case and label ``l`` (label maps on the source grid, :mod:`medinfer.io`):

- Dice ``2 |P∩G| / (|P| + |G|)``, 1.0 when the label is absent from both (so every case
  counts for every label and the case-weighted mean equals the central mean);
- HD95: 95th percentile of the symmetric surface distances in mm (MONAI
  ``compute_hausdorff_distance(percentile=95, spacing=...)``); only cases where the label
  is present in both maps count (``hd95_cases``).

Site data (``split_cases``): ``imagesTs/<case>_0000.nii.gz`` + ``labelsTs/<case>.nii.gz``
(nnU-Net layout) or ``<case>.nii.gz`` + ``<case>_seg.nii.gz`` pairs. In the simulation each
site's case list is handed to its ``ClientApp`` by partition id; in a real deployment a
SuperNode is started with ``--node-config "data-path='/site/data'"`` and the client reads
that folder (docs/federated.md).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medinfer.errors import ConfigError, InvalidImageError

__all__ = ["LabelledCase", "split_cases", "find_cases", "evaluate_cases", "make_apps",
           "run_simulation", "aggregate"]

LabelledCase = tuple[str, str, str]  # (case id, image path, label path)


def find_cases(folder: str | os.PathLike[str]) -> list[LabelledCase]:
    """Labelled cases of a folder, sorted by case id (layouts in the module docstring).

    Raises
    ------
    InvalidImageError
        The folder is missing or holds no image/label pair.
    """
    d = Path(folder)
    if not d.is_dir():
        raise InvalidImageError(f"--data {d}: no such folder")
    cases: list[LabelledCase] = []
    if (d / "imagesTs").is_dir() and (d / "labelsTs").is_dir():
        for img in sorted((d / "imagesTs").glob("*_0000.nii.gz")):
            case = img.name[: -len("_0000.nii.gz")]
            lab = d / "labelsTs" / f"{case}.nii.gz"
            if lab.is_file():
                cases.append((case, str(img), str(lab)))
    else:
        for lab in sorted(d.glob("*_seg.nii.gz")):
            case = lab.name[: -len("_seg.nii.gz")]
            img = d / f"{case}.nii.gz"
            if img.is_file():
                cases.append((case, str(img), str(lab)))
    if not cases:
        raise InvalidImageError(f"--data {d}: no labelled case (imagesTs/<case>_0000.nii.gz "
                                "+ labelsTs/<case>.nii.gz, or <case>.nii.gz + "
                                "<case>_seg.nii.gz)")
    return cases


def split_cases(folder: str | os.PathLike[str], sites: int) -> list[list[LabelledCase]]:
    """The labelled cases of ``folder`` dealt round-robin to ``sites`` sites (each gets at
    least one; :class:`ConfigError` if ``sites`` < 1 or > the number of cases)."""
    cases = find_cases(folder)
    if not 1 <= sites <= len(cases):
        raise ConfigError(f"--sites: {sites} is not allowed; choose 1..{len(cases)} (one "
                          f"case per site at least; {folder} holds {len(cases)})")
    return [cases[i::sites] for i in range(sites)]


def _dice(p: np.ndarray, g: np.ndarray) -> float:
    denom = int(p.sum()) + int(g.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, g).sum()) / denom


def _hd95(p: np.ndarray, g: np.ndarray, spacing: Sequence[float]) -> float | None:
    if not p.any() or not g.any():
        return None
    import torch
    from monai.metrics import compute_hausdorff_distance

    tp = torch.from_numpy(p[None, None].astype(np.float32))
    tg = torch.from_numpy(g[None, None].astype(np.float32))
    value = compute_hausdorff_distance(tp, tg, include_background=True, percentile=95,
                                       spacing=[float(s) for s in spacing])
    return float(value.reshape(-1)[0])


def evaluate_cases(cases: Sequence[LabelledCase], model: str, device: str = "cpu"
                   ) -> dict[str, Any]:
    """Run ``model`` on ``cases`` and measure them (the work of one site).

    Returns
    -------
    dict
        ``num_cases``; ``labels`` (value -> name); per label value ``l``: ``dice_mean[l]``,
        ``hd95_mean[l]`` (mm, ``nan`` if no case counts), ``hd95_cases[l]``; ``per_case``
        (case id -> {label: Dice}).

    Raises
    ------
    GeometryError
        A label map whose grid is not its image's.
    """
    from medinfer import io
    from medinfer.errors import GeometryError
    from medinfer.federated.analyzer import NodeConfig, open_node_model

    card, predictor = open_node_model(NodeConfig(model=model, device=device))
    labels = {int(v): s.name for v, s in card.labels.items() if int(v) != 0}
    dice: dict[int, list[float]] = {v: [] for v in labels}
    hd: dict[int, list[float]] = {v: [] for v in labels}
    per_case: dict[str, dict[str, float]] = {}
    for case, img, lab in cases:
        volume = io.load(img)
        truth = io.load(lab)
        if truth.spatial_shape != volume.spatial_shape or not np.allclose(
                truth.affine, volume.affine, atol=1e-3):
            raise GeometryError(f"{lab}: label grid differs from its image {img}")
        pred = np.asarray(predictor.predict(volume).label.array[0])
        gt = np.rint(np.asarray(truth.array[0])).astype(np.int64)
        per_case[case] = {}
        for v in labels:
            d = _dice(pred == v, gt == v)
            dice[v].append(d)
            per_case[case][str(v)] = d
            h = _hd95(pred == v, gt == v, [float(x) for x in volume.spacing])
            if h is not None:
                hd[v].append(h)
    return {"num_cases": len(cases), "labels": {str(v): n for v, n in labels.items()},
            "dice_mean": {str(v): float(np.mean(x)) for v, x in dice.items()},
            "hd95_mean": {str(v): float(np.mean(x)) if x else float("nan")
                          for v, x in hd.items()},
            "hd95_cases": {str(v): len(x) for v, x in hd.items()},
            "per_case": per_case}


def aggregate(site_metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Case-weighted means over sites (``dice``: weights ``num_cases``; ``hd95``: weights
    ``hd95_cases``) and the per-site table."""
    total = sum(int(m["num_cases"]) for m in site_metrics.values())
    label_keys = sorted({k for m in site_metrics.values() for k in m["dice_mean"]}, key=int)
    dice = {k: sum(m["num_cases"] * m["dice_mean"][k] for m in site_metrics.values()) / total
            for k in label_keys}
    hd95: dict[str, float | None] = {}
    for k in label_keys:
        n = sum(int(m["hd95_cases"][k]) for m in site_metrics.values())
        hd95[k] = (sum(m["hd95_cases"][k] * m["hd95_mean"][k] for m in site_metrics.values()
                       if m["hd95_cases"][k]) / n) if n else None
    return {"total_cases": total, "dice": dice, "hd95_mm": hd95,
            "sites": {s: {k: m[k] for k in ("num_cases", "dice_mean", "hd95_mean",
                                                "hd95_cases")}
                      for s, m in sorted(site_metrics.items())}}


def _to_metric_record(m: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"num-cases": int(m["num_cases"])}
    for k in m["dice_mean"]:
        out[f"dice.{k}"] = float(m["dice_mean"][k])
        out[f"hd95.{k}"] = float(m["hd95_mean"][k])
        out[f"hd95-cases.{k}"] = int(m["hd95_cases"][k])
    return out


def _from_metric_record(rec: Mapping[str, Any]) -> dict[str, Any]:
    m: dict[str, Any] = {"num_cases": int(rec["num-cases"]), "dice_mean": {},
                         "hd95_mean": {}, "hd95_cases": {}}
    for key, value in rec.items():
        match = re.fullmatch(r"(dice|hd95|hd95-cases)\.(\d+)", key)
        if match:
            field = {"dice": "dice_mean", "hd95": "hd95_mean",
                     "hd95-cases": "hd95_cases"}[match[1]]
            m[field][match[2]] = value
    return m


def make_apps(model: str, output_dir: str | os.PathLike[str], *, device: str = "cpu",
              site_cases: Sequence[Sequence[LabelledCase]] | None = None,
              num_sites: int | None = None) -> tuple[Any, Any]:
    """``(server_app, client_app)`` for federated evaluation.

    ``site_cases`` (simulation): the cases of the site with partition id ``i``; without it
    each client reads ``--node-config data-path=...`` (a real SuperNode). The server waits
    for ``num_sites`` nodes (default ``len(site_cases)``), writes ``evaluation.json`` and
    ``sites.csv`` under ``output_dir``.
    """
    try:
        from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
        from flwr.clientapp import ClientApp
        from flwr.serverapp import Grid, ServerApp
    except ImportError as exc:
        raise ConfigError("medinfer federated evaluate needs Flower: pip install "
                          f"'medinfer[federated]' ({exc})") from None

    expected = num_sites if num_sites is not None else len(site_cases or [])
    out = Path(output_dir)
    client = ClientApp()

    @client.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        nc = context.node_config
        if site_cases is not None:
            site = int(nc["partition-id"])
            cases = list(site_cases[site])
        else:
            site = int(nc.get("partition-id", 0))
            cases = find_cases(str(nc["data-path"]))
        metrics = evaluate_cases(cases, str(cfg["model"]), str(cfg["device"]))
        rec = _to_metric_record(metrics)
        rec["site"] = site
        return Message(RecordDict({"metrics": MetricRecord(rec)}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + 600
        nodes = list(grid.get_node_ids())
        while len(nodes) < max(expected, 1) and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = list(grid.get_node_ids())
        content = RecordDict({"config": ConfigRecord({"model": model, "device": device})})
        messages = [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE)
                    for n in nodes]
        replies = list(grid.send_and_receive(messages))
        site_metrics: dict[str, dict[str, Any]] = {}
        errors = []
        for reply in replies:
            if reply.has_error():
                errors.append(str(reply.error.reason))
                continue
            rec: dict[str, Any] = dict(reply.content["metrics"])
            site_metrics[f"site-{int(rec.pop('site'))}"] = _from_metric_record(rec)
        report: dict[str, Any] = {"model": model, "errors": errors}
        if site_metrics:
            report.update(aggregate(site_metrics))
        _write_report(report, out)

    return server, client


def _write_report(report: Mapping[str, Any], out: Path) -> None:
    from medinfer._atomic import write_text_atomic

    write_text_atomic(out / "evaluation.json", json.dumps(report, indent=2) + "\n")
    sites = report.get("sites", {})
    keys = sorted(report.get("dice", {}), key=int)
    lines = ["site,num_cases," + ",".join(f"dice_{k},hd95_{k}" for k in keys)]
    for s, m in sites.items():
        lines.append(f"{s},{m['num_cases']}," + ",".join(
            f"{m['dice_mean'][k]:.6f},{m['hd95_mean'][k]:.4f}" for k in keys))
    write_text_atomic(out / "sites.csv", "\n".join(lines) + "\n")


def run_simulation(site_cases: Sequence[Sequence[LabelledCase]], *, model: str,
                   output_dir: str | os.PathLike[str], device: str = "cpu",
                   backend_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Federated evaluation on Flower's simulation engine, one SuperNode per site.

    Returns the report (``evaluation.json``): ``total_cases``, ``dice`` / ``hd95_mm``
    (case-weighted, per label value), ``sites`` (per-site table), ``errors``.

    Raises
    ------
    ConfigError
        Flower is not installed, or no site answered (the sites' errors in the message).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    server, client = make_apps(model, out, device=device, site_cases=site_cases)
    from flwr.simulation import run_simulation as flwr_run_simulation

    (out / "evaluation.json").unlink(missing_ok=True)
    # Flower's Ray backend writes the driver's sys.path into os.environ["PYTHONPATH"] and
    # leaves it there: every later subprocess of the caller would then see this venv's
    # packages. Restore the caller's value.
    saved_pythonpath = os.environ.get("PYTHONPATH")
    try:
        flwr_run_simulation(server_app=server, client_app=client,
                            num_supernodes=len(site_cases),
                            backend_config=backend_config or {
                                "client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        if saved_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_pythonpath
    path = out / "evaluation.json"
    if not path.is_file():
        raise ConfigError("federated evaluation: the Flower run ended without a report")
    report: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if "sites" not in report:
        raise ConfigError(f"federated evaluation: no site answered ({report['errors']})")
    return report
