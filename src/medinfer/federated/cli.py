"""``medinfer federated run-local | evaluate``: try a federated node before deploying it.

- ``run-local --data PATH... --model M -o OUT``: the FLAME analyzer and the pass-through
  aggregator in one process, one round, the way the SDK's model tester runs them; writes
  ``OUT/result.json`` (the result with each bytes value replaced by its file name) and the
  files under ``OUT/dicom_seg/`` and ``OUT/nifti_seg/``.
- ``evaluate --sites N``: federated evaluation of a model on Flower's simulation engine
  (:mod:`medinfer.federated.flower`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

federated_app = typer.Typer(
    help="Federated nodes: FLAME analysis (run-local) and Flower evaluation.",
    no_args_is_help=True)


def read_payloads(paths: list[Path]) -> list[dict[str, bytes]]:
    """One ``{name: bytes}`` dict per path (the ``data_type="s3"`` shape): a file as itself,
    a folder as its files (names relative to the folder, links not followed).

    Raises
    ------
    InvalidImageError
        A path that does not exist or is neither a file nor a folder.
    """
    from medinfer.errors import InvalidImageError

    out: list[dict[str, bytes]] = []
    for p in paths:
        if p.is_file():
            out.append({p.name: p.read_bytes()})
        elif p.is_dir():
            out.append({f.relative_to(p).as_posix(): f.read_bytes()
                        for f in sorted(p.rglob("*")) if f.is_file() and not f.is_symlink()})
        else:
            raise InvalidImageError(f"--data {p}: no such file or folder")
    return out


def write_result(result: dict[str, Any], out_dir: Path) -> Path:
    """Write the node's result under ``out_dir`` (atomically); the path of result.json."""
    import json

    from medinfer._atomic import write_bytes_atomic, write_text_atomic

    doc = dict(result)
    for key, folder in (("dicom_seg_bytes", "dicom_seg"), ("nifti_seg_bytes", "nifti_seg")):
        names = {}
        for name, blob in result.get(key, {}).items():
            write_bytes_atomic(out_dir / folder / name, blob)
            names[name] = f"{folder}/{name}"
        doc[key] = names
    return write_text_atomic(out_dir / "result.json", json.dumps(doc, indent=2) + "\n")


@federated_app.command("run-local", context_settings={"allow_extra_args": True})
def run_local(
    ctx: typer.Context,
    data: list[Path] = typer.Option(..., "--data", help="Files or folders a site would send "
                                    "(NIfTI, DICOM, TAR/zip archives); several allowed."),
    model: str = typer.Option("demo-brain", "--model", "-m",
                              help="medinfer model, nnU-Net v1/v2 folder or MONAI bundle."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder."),
    folds: str | None = typer.Option(None, "--folds", help="nnU-Net folds, e.g. 0,1,2."),
    tta: bool | None = typer.Option(None, "--tta/--no-tta", help="Test-time augmentation."),
    multi_modal: bool = typer.Option(False, "--multi-modal",
                                     help="Group NIfTI files by _XXXX channel suffixes."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    work_dir: Path | None = typer.Option(None, "--work-dir",
                                         help="Base of the temporary work folder."),
) -> None:
    """Run the FLAME analyzer + aggregator locally, one round, as the SDK's tester does."""
    from medinfer.errors import MedinferError
    from medinfer.federated.analyzer import NodeConfig
    from medinfer.federated.star import NnUNetAnalyzer, PassThroughAggregator

    extra = [Path(a) for a in ctx.args]
    if any(str(a).startswith("-") for a in extra):
        raise MedinferError(f"run-local: unknown option(s) {', '.join(map(str, extra))}")
    config = NodeConfig(model=model, folds=tuple(f for f in folds.split(",") if f) if folds
                        else None, tta=tta, multi_modal=multi_modal, device=device,
                        work_dir=str(work_dir) if work_dir else None)
    payloads = read_payloads(list(data) + extra)
    analyzer = NnUNetAnalyzer.configured(config)(None)
    aggregator = PassThroughAggregator(None)
    aggregated = aggregator.aggregation_method([analyzer.analysis_method(payloads, None)])
    aggregator.has_converged(aggregated, None)
    result = aggregated[0]
    path = write_result(result, output)
    typer.echo(f"{result['status']}: {len(result['dicom_seg_bytes'])} DICOM SEG, "
               f"{len(result['nifti_seg_bytes'])} NIfTI; {path}")
    if result["status"] != "done":
        raise MedinferError(f"run-local: nothing could be processed: {result.get('reason')}")


@federated_app.command("evaluate")
def evaluate(
    sites: int = typer.Option(3, "--sites", help="Number of simulated sites (>= 1)."),
    data: Path = typer.Option(..., "--data", help="Folder of labelled cases: "
                              "imagesTs/<case>_0000.nii.gz + labelsTs/<case>.nii.gz (nnU-Net "
                              "layout) or <case>.nii.gz + <case>_seg.nii.gz pairs."),
    model: str = typer.Option("demo-brain", "--model", "-m", help="Model to evaluate."),
    output: Path = typer.Option(..., "--output", "-o", help="Report folder."),
    device: str = typer.Option("cpu", "--device", help="auto | cpu | cuda[:N]."),
) -> None:
    """Federated evaluation on Flower's simulation engine: per-site Dice/HD95, case-weighted
    means; writes OUT/evaluation.json and OUT/sites.csv."""
    from medinfer.federated.flower import run_simulation, split_cases

    parts = split_cases(data, sites)
    report = run_simulation(parts, model=model, device=device, output_dir=output)
    typer.echo(f"{sites} sites, {report['total_cases']} cases; case-weighted Dice: "
               + ", ".join(f"{k} {v:.4f}" for k, v in report["dice"].items())
               + f"; {output / 'evaluation.json'}")


def register(app: typer.Typer) -> None:
    """Add ``medinfer federated``."""
    app.add_typer(federated_app, name="federated")
