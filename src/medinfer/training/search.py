"""``medinfer search``: hyper-parameter search with optuna over :func:`train`.

Searched: learning rate (log-uniform 1e-4..1e-1), loss weights (Dice weight 0.2..1,
CE/focal weight 1 - Dice weight + 0.2), network width (UNet ``channels`` /
BasicUNet ``features`` / SegResNet ``init_filters`` times 0.5, 1 or 2), patch size (the
config's or one ``pad_multiple`` larger per axis). Each trial trains into
``<out>/trials/<n>`` and reports its validation metric to optuna; the median pruner
stops trials below the median of earlier trials at the same step. The study lives in
SQLite (``<out>/search.db``): running the same command again resumes it and only runs
the trials still missing. The best trial's config is written to ``<out>/best_config.yaml``.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from medinfer._atomic import write_text_atomic
from medinfer.errors import ConfigError
from medinfer.training.config import TrainConfig

log = logging.getLogger(__name__)

STUDY_NAME = "medinfer-search"
_WIDTH_KEYS = {"UNet": "channels", "BasicUNet": "features", "SegResNet": "init_filters",
               "DynUNet": "filters"}


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("medinfer search needs optuna: pip install 'medinfer[training]'") \
            from None
    return optuna


def trial_config(base: TrainConfig, params: dict[str, Any], out: Path) -> TrainConfig:
    """``base`` with a trial's parameters applied (``out`` is the trial folder)."""
    from medinfer.training.loop import network_kwargs

    data = base.to_yaml_dict()
    data["out"] = str(out)
    data["lr"] = params["lr"]
    data["dice_weight"] = params["dice_weight"]
    data["ce_weight"] = round(1.2 - params["dice_weight"], 6)
    if params.get("larger_patch"):
        data["patch_size"] = [p + base.pad_multiple for p in base.patch_size]
    key = _WIDTH_KEYS.get(base.network.value)
    kw = network_kwargs(base)
    if key is not None and key in kw:
        w = params["width"]
        v = kw[key]
        kw[key] = ([max(2, round(c * w)) for c in v] if isinstance(v, list)
                   else max(2, round(v * w)))
        data["network_kwargs"] = {k: v for k, v in kw.items()
                                  if k not in ("spatial_dims", "in_channels", "out_channels")}
    return TrainConfig.from_mapping(data, "search trial")


def run_search(base: TrainConfig, trials: int, out: str | Path | None = None) -> dict[str, Any]:
    """Run (or resume) the study until it holds ``trials`` finished trials.

    Parameters
    ----------
    base : the training configuration (``max_steps`` per trial, data, network).
    trials : total number of finished (complete or pruned) trials wanted.
    out : search folder (default: ``base.out``).

    Returns
    -------
    ``{"best_value", "best_params", "best_config" (path), "trials" (finished count),
    "ran" (trials run by this call)}``.

    Raises
    ------
    ConfigError
        ``trials`` < 1, no output folder, optuna missing, no trial finished.
    """
    optuna = _optuna()
    from optuna.trial import TrialState

    from medinfer.training.loop import train

    if trials < 1:
        raise ConfigError(f"--trials: {trials} is not allowed; use an integer >= 1")
    folder = Path(out) if out is not None else base.out
    if folder is None:
        raise ConfigError("out: a search folder is required (--out)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=f"sqlite:///{folder / 'search.db'}",
        direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=base.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    finished = (TrialState.COMPLETE, TrialState.PRUNED)

    def objective(trial: Any) -> float:
        params = {
            "lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
            "dice_weight": trial.suggest_float("dice_weight", 0.2, 1.0),
            "width": trial.suggest_categorical("width", [0.5, 1.0, 2.0]),
            "larger_patch": trial.suggest_categorical("larger_patch", [False, True]),
        }
        cfg = trial_config(base, params, folder / "trials" / str(trial.number))

        def report(step: int, loss: float, metric: float | None) -> None:
            if metric is not None:
                trial.report(metric, step)
                if trial.should_prune():
                    raise optuna.TrialPruned()

        result = train(cfg, resume=False, callback=report, export=False)
        if result.best_metric is None:
            raise ConfigError("search: a trial finished without validation metric")
        return float(result.best_metric)

    done = len(study.get_trials(deepcopy=False, states=finished))
    ran = max(0, trials - done)
    if ran:
        study.optimize(objective, n_trials=ran, catch=())
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ConfigError("search: no trial completed (all pruned or failed)")
    best = study.best_trial
    best_cfg = trial_config(base, dict(best.params), folder / "best")
    import yaml

    path = write_text_atomic(folder / "best_config.yaml",
                             f"# best of {len(complete)} completed trials, validation "
                             f"metric {best.value:.6f} (trial {best.number})\n"
                             + yaml.safe_dump(best_cfg.to_yaml_dict(), sort_keys=False))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["trial", "state", "value", "lr", "dice_weight", "width", "larger_patch"])
    for t in study.get_trials(deepcopy=False):
        w.writerow([t.number, t.state.name, t.value, *(t.params.get(k) for k in
                    ("lr", "dice_weight", "width", "larger_patch"))])
    write_text_atomic(folder / "search_trials.csv", buf.getvalue())
    return {"best_value": best.value, "best_params": dict(best.params),
            "best_config": path, "trials": len(study.get_trials(deepcopy=False,
                                                                 states=finished)),
            "ran": ran}
