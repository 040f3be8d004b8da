"""``medinfer train``, ``medinfer evaluate`` and ``medinfer search`` (plugin module).

Bad input (any :class:`medinfer.errors.MedinferError`) exits with code 2 and one line on
stderr (handled by :mod:`medinfer.cli`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def _overrides(**kw: Any) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items() if v is not None}


def _config(config: Path | None, overrides: dict[str, Any]) -> Any:
    from medinfer.training.config import TrainConfig

    if config is not None:
        return TrainConfig.from_yaml(config, overrides)
    return TrainConfig.from_mapping(overrides, "command line")


def register(app: typer.Typer) -> None:
    """Add ``train``, ``evaluate`` and ``search`` to the ``medinfer`` command."""

    @app.command("train")
    def train_cmd(
        config: Path | None = typer.Option(None, "--config", "-c", help="train.yaml."),
        images: Path | None = typer.Option(None, "--images", help="Image folder."),
        labels: Path | None = typer.Option(None, "--labels", help="Label-map folder."),
        out: Path | None = typer.Option(None, "--out", "-o",
                                        help="Output (model) folder."),
        network: str | None = typer.Option(None, "--network",
                                           help="UNet, BasicUNet, SegResNet, DynUNet, "
                                                "SwinUNETR."),
        max_steps: int | None = typer.Option(None, "--max-steps", help="Training steps."),
        patch_size: tuple[int, int, int] | None = typer.Option(
            None, "--patch-size", help="Patch size I J K (voxels)."),
        batch_size: int | None = typer.Option(None, "--batch-size"),
        lr: float | None = typer.Option(None, "--lr", help="AdamW learning rate."),
        seed: int | None = typer.Option(None, "--seed"),
        patience: int | None = typer.Option(None, "--patience",
                                            help="Early-stopping patience (validations)."),
        resume: bool = typer.Option(True, "--resume/--no-resume",
                                    help="Continue from <out>/checkpoints/last.pt."),
    ) -> None:
        """Train a segmentation network; --out becomes a model folder for predict."""
        from rich.progress import Progress

        from medinfer.training.loop import train

        cfg = _config(config, _overrides(
            images=images, labels=labels, out=out, network=network, max_steps=max_steps,
            patch_size=patch_size, batch_size=batch_size, lr=lr, seed=seed,
            patience=patience))
        with Progress(transient=True) as bar:
            task = bar.add_task("training", total=cfg.max_steps)
            last_metric: list[float | None] = [None]

            def cb(step: int, loss: float, metric: float | None) -> None:
                if metric is not None:
                    last_metric[0] = metric
                m = "" if last_metric[0] is None else f" val {last_metric[0]:.3f}"
                bar.update(task, completed=step, description=f"loss {loss:.4f}{m}")

            result = train(cfg, resume=resume, callback=cb)
        typer.echo(f"{result.out}: {result.steps} steps"
                   + (" (early stopping)" if result.stopped_early else "")
                   + (f", best validation {result.best_metric:.4f} at step "
                      f"{result.best_step}" if result.best_metric is not None else ""))

    @app.command("evaluate")
    def evaluate_cmd(
        model: str = typer.Option(..., "--model", "-m",
                                  help="Model folder, its model.yaml or a bundled name."),
        images: Path | None = typer.Option(None, "--images", help="Image folder."),
        labels: Path | None = typer.Option(None, "--labels", help="Label-map folder."),
        cases: Path | None = typer.Option(None, "--cases", help="CSV/JSON list of cases."),
        output: Path = typer.Option(..., "--output", "-o", help="Output folder."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        tolerance: float = typer.Option(1.0, "--tolerance-mm",
                                        help="Surface-Dice tolerance (mm)."),
    ) -> None:
        """Score a segmentation model on labelled cases: metrics tables and figures."""
        from medinfer.training.evaluate import evaluate_model

        result = evaluate_model(model, output, images=images, labels=labels, cases=cases,
                                device=device, tolerance_mm=tolerance)
        for name, m in result["summary"].items():
            typer.echo(f"{name}: Dice {m['dice']['mean']:.4f} +- {m['dice']['sd']:.4f}, "
                       f"IoU {m['iou']['mean']:.4f}, HD95 {m['hd95']['mean']:.2f} mm")

    @app.command("search")
    def search_cmd(
        config: Path = typer.Option(..., "--config", "-c", help="train.yaml."),
        trials: int = typer.Option(20, "--trials", help="Finished trials wanted in total."),
        out: Path | None = typer.Option(None, "--out", "-o",
                                        help="Search folder [default: config's out]."),
        max_steps: int | None = typer.Option(None, "--max-steps", help="Steps per trial."),
    ) -> None:
        """Hyper-parameter search (optuna, resumable SQLite study); writes best_config.yaml."""
        from medinfer.training.search import run_search

        cfg = _config(config, _overrides(max_steps=max_steps))
        res = run_search(cfg, trials, out)
        typer.echo(f"{res['trials']} trials ({res['ran']} run now); best validation "
                   f"{res['best_value']:.4f} with {res['best_params']}; "
                   f"config: {res['best_config']}")
