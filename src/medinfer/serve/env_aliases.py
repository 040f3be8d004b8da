"""``UNET3D_*`` environment variables as aliases of the ``MEDINFER_*`` service settings.

The UNet3D segmentation suite (``docs/compat/unet3d.md``) configures its service with
``UNET3D_MODEL_PATH``, ``UNET3D_DEVICE``, ``UNET3D_DEFAULT_THRESHOLD``,
``UNET3D_PAD_MULTIPLE``, ``UNET3D_CLIP_PERCENTILES`` and ``UNET3D_ALLOW_ORIGINS``. Each
is read as the ``MEDINFER_*`` setting it means (:data:`UNET3D_ALIASES`), with the same
value syntax. A variable that is set but unusable fails start-up with a message naming
it (never a silent fall-back): ``UNET3D_MODEL_PATH`` must name an existing model (weights
file, model folder or bundled name) that can be matched to an architecture, and
``UNET3D_DEVICE=cuda`` needs CUDA. Both prefixes set to different values is an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from medinfer.errors import ConfigError

__all__ = ["UNET3D_ALIASES", "unet3d_settings"]

#: ``UNET3D_<suffix>`` -> field of :class:`medinfer.serve.settings.ServeSettings`
UNET3D_ALIASES: dict[str, str] = {
    "MODEL_PATH": "model",
    "DEVICE": "device",
    "DEFAULT_THRESHOLD": "threshold",
    "PAD_MULTIPLE": "pad_multiple",
    "CLIP_PERCENTILES": "clip_percentiles",
    "ALLOW_ORIGINS": "cors_origins",
}


def unet3d_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Settings given through ``UNET3D_*`` variables: field name -> raw string value.

    Raises
    ------
    ConfigError
        ``UNET3D_X`` and ``MEDINFER_Y`` both set and different; ``UNET3D_MODEL_PATH`` names
        nothing loadable; ``UNET3D_DEVICE=cuda`` without CUDA. The message names the
        variable and its value.
    """
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for suffix, field in UNET3D_ALIASES.items():
        name = f"UNET3D_{suffix}"
        value = env.get(name)
        if value is None:
            continue
        native_name = f"MEDINFER_{field.upper()}"
        native = env.get(native_name)
        if native is not None and native.strip() != value.strip():
            raise ConfigError(f"{name}={value!r} and {native_name}={native!r} are both set and "
                              "differ; set one of them")
        out[field] = value
    if "model" in out:
        _check_model(out["model"])
    if out.get("device", "").strip().lower().startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"UNET3D_DEVICE={out['device']!r}: CUDA is not available on this "
                              "machine; use cpu or auto")
    return out


def _check_model(value: str) -> None:
    from medinfer.errors import ModelError
    from medinfer.models import bundled_models
    from medinfer.models.checkpoint import resolve_checkpoint

    if not value.strip():
        raise ConfigError("UNET3D_MODEL_PATH: empty; give a checkpoint file or model folder")
    if not os.path.exists(value) and value not in bundled_models():
        raise ConfigError(f"UNET3D_MODEL_PATH={value!r}: no such file or folder (nor a bundled "
                          f"model: {', '.join(bundled_models())})")
    try:
        resolve_checkpoint(value)
    except ModelError as exc:
        raise ConfigError(f"UNET3D_MODEL_PATH={value!r}: {exc}") from None
