"""MONAI bundles: detection, ``metadata.json`` and the display card (loader side).

A bundle is a folder with ``configs/metadata.json``, an inference config
(``configs/inference.json`` / ``.yaml`` / ``.yml``) and ``models/model.pt`` or
``models/model.ts``. Only ``metadata.json`` (plain JSON) is read here; running a bundle
(its own pre-processing, network, inferer and post-processing, config code that needs
``trust_model_code=True``) is :class:`medinfer.formats.monai_bundle.MonaiBundle`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medinfer._jsonio import read_json_object
from medinfer.errors import ModelError

__all__ = [
    "TRUST_MESSAGE",
    "bundle_display_card",
    "bundle_label_names",
    "find_inference_config",
    "is_monai_bundle",
    "read_bundle_metadata",
]

_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
MAX_CONFIG_BYTES = 5_000_000

TRUST_MESSAGE = (
    "{path}: this MONAI bundle's config can execute code ('$' expressions are evaluated "
    "with Python eval and '_target_' instantiates arbitrary classes), so it is only run "
    "with explicit consent: pass trust_model_code=True (CLI: --trust-model-code) if you "
    "trust the bundle's origin"
)


def find_inference_config(path: str | os.PathLike[str]) -> Path | None:
    """The bundle's inference config (``configs/inference.{json,yaml,yml}``), or None."""
    root = Path(path) / "configs"
    for name in _CONFIG_NAMES:
        if (root / name).is_file():
            return root / name
    return None


def is_monai_bundle(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a folder with ``configs/metadata.json`` and an inference config."""
    p = Path(path)
    return p.is_dir() and (p / "configs" / "metadata.json").is_file() and \
        find_inference_config(p) is not None


def read_bundle_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``configs/metadata.json`` (plain JSON; safe without trusting the bundle).

    Raises
    ------
    ModelError
        Missing, too large or invalid JSON.
    """
    f = Path(path) / "configs" / "metadata.json"
    return read_json_object(
        f, max_bytes=MAX_CONFIG_BYTES, error=ModelError,
        missing=f"{path}: not a MONAI bundle (no configs/metadata.json)",
    )


def bundle_label_names(meta: dict[str, Any]) -> dict[int, str]:
    """Label value -> name from ``network_data_format.outputs.pred.channel_def`` of
    ``metadata.json`` (empty when absent)."""
    out = {}
    try:
        ch = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        for k, v in ch.items():
            out[int(k)] = str(v)
    except (KeyError, TypeError, ValueError):
        pass
    return out


def bundle_display_card(path: str | os.PathLike[str]) -> Any:
    """Display :class:`~medinfer.models.ModelCard` of a bundle from ``metadata.json`` only
    (no config code runs): name, version, label names of ``channel_def``."""
    from medinfer.models.nnunet import display_card

    meta = read_bundle_metadata(path)
    names = bundle_label_names(meta) or {0: "background", 1: "foreground"}
    return display_card(str(meta.get("name", Path(path).name)), names,
                        "configs/metadata.json", str(meta.get("version", "")))
