"""Model formats that bring their own pipeline, run on medinfer's engine.

This layer sits above the engine (:mod:`medinfer.inference`) and the loaders
(:mod:`medinfer.models`) and uses only their public API; nothing below imports it.

- :mod:`medinfer.formats.nnunet`: nnU-Net v2 model folders
  (:class:`~medinfer.formats.nnunet.NnUNetPredictor`: nnU-Net's pre-processing, windows,
  TTA and export);
- :mod:`medinfer.formats.monai_bundle`: MONAI bundles
  (:class:`~medinfer.formats.monai_bundle.MonaiBundle`: the bundle's own config).

:func:`open_predictor` opens any supported model (these formats or a medinfer model
card) for the front doors (CLI, server).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["open_predictor"]


def open_predictor(
    model: str,
    *,
    device: str = "auto",
    tta: bool | None = None,
    overlap: float | None = None,
    batch_size: int | None = None,
    save_probabilities: bool = False,
    stream: bool = True,
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "final",
    trust_model_code: bool = False,
    force: bool = False,
) -> tuple[Any, Any]:
    """Open any supported model for ``medinfer predict``: ``(display card, predictor)``.

    ``model`` is a medinfer model folder / ``model.yaml`` / bundled name, an nnU-Net v2
    model folder (``dataset.json`` + ``plans.json`` + ``fold_*``), an nnU-Net v1 model
    folder (``plans.pkl`` + ``fold_*/*.model``; ``checkpoint`` ``final`` or ``best`` =
    ``model_final_checkpoint`` / ``model_best``) or a MONAI bundle
    (``configs/metadata.json``). The predictor has ``predict(volume, progress) ->
    Prediction``; the card gives label names and colours for tables, overlays and
    ``<case>_stats.json``.

    Parameters
    ----------
    tta : None = the model's default (card axes; nnU-Net: on); False/True.
    stream : medinfer cards: streaming engine (exact, lean; default) or the full-volume
        path. nnU-Net folders always stream; MONAI bundles run their own inferer.
    folds, checkpoint : nnU-Net only (default: all folds, ``final``).
    trust_model_code : MONAI bundles only; required to run their config code.
    force : medinfer cards only: run scans that do not fit the card's input contract
        even where the card refuses them (:mod:`medinfer.inference.contract`).

    Raises
    ------
    ModelError, ConfigError
        Unknown model, invalid files or options (e.g. ``--folds`` for a medinfer card).
    """
    from medinfer.errors import ConfigError
    from medinfer.formats.monai_bundle import MonaiBundle
    from medinfer.formats.nnunet import NnUNetPredictor
    from medinfer.models.monai_bundle import is_monai_bundle
    from medinfer.models.nnunet import is_nnunet_folder

    if is_nnunet_folder(model):
        if overlap is not None and not 0.0 <= overlap < 1.0:
            raise ConfigError(f"overlap: expected 0 <= overlap < 1, got {overlap}")
        nn = NnUNetPredictor(model, folds=folds, checkpoint=checkpoint, device=device,
                             tta=True if tta is None else tta,
                             step_size=0.5 if overlap is None else 1.0 - overlap,
                             save_probabilities=save_probabilities, batch_size=batch_size)
        return nn.card, nn
    from medinfer.models.nnunet_v1 import is_nnunet_v1_folder

    if is_nnunet_v1_folder(model):
        from medinfer.formats.nnunet_v1 import NnUNetV1Predictor

        if overlap is not None and not 0.0 <= overlap < 1.0:
            raise ConfigError(f"overlap: expected 0 <= overlap < 1, got {overlap}")
        chk = {"final": "model_final_checkpoint", "best": "model_best"}.get(checkpoint)
        if chk is None:
            raise ConfigError(f"checkpoint: {checkpoint!r} is not allowed; choose 'final' or "
                              "'best'")
        v1 = NnUNetV1Predictor(model, folds=folds, checkpoint=chk, device=device,
                               tta=True if tta is None else tta,
                               step_size=0.5 if overlap is None else 1.0 - overlap,
                               save_probabilities=save_probabilities, batch_size=batch_size)
        return v1.card, v1
    if folds is not None or checkpoint != "final":
        raise ConfigError(f"--folds / --checkpoint apply to nnU-Net model folders only; "
                          f"{model!r} is not one (dataset.json, plans.json, fold_*/)")
    if is_monai_bundle(model):
        bundle = MonaiBundle(model, trust_model_code=trust_model_code, device=device)
        return bundle.card, bundle
    from medinfer.inference.batch import StreamingPredictor
    from medinfer.inference.predictor import Predictor
    from medinfer.models.loaders import load_model, resolve_model

    card, model_dir = resolve_model(model)
    net = load_model(card, model_dir, device)
    pred = Predictor(card, net, device=device, tta=tta, overlap=overlap,
                     batch_size=batch_size, save_probabilities=save_probabilities, force=force)
    return card, (StreamingPredictor(pred) if stream else pred)
