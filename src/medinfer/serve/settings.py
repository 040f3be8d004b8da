"""Service settings, read from ``MEDINFER_*`` environment variables (pydantic-settings).

Every field below maps to the environment variable ``MEDINFER_<FIELD NAME IN CAPITALS>``;
``docs/serving.md`` lists them with their defaults. List-valued settings
(``MEDINFER_API_KEYS``, ``MEDINFER_CORS_ORIGINS``) accept a comma-separated string or a
JSON list; ``MEDINFER_CLIP_PERCENTILES`` accepts ``"0.5,99.5"`` or a JSON list.

Invalid values raise :class:`medinfer.errors.ConfigError` naming the variable.
The UNet3D names (``UNET3D_MODEL_PATH``, ``UNET3D_DEVICE``, ...) are aliases
(:mod:`medinfer.serve.env_aliases`).
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from medinfer.errors import ConfigError


class Device(StrEnum):
    """Where the model runs: ``auto`` picks CUDA when available, else CPU."""

    AUTO = "auto"
    CUDA = "cuda"
    CPU = "cpu"


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class ServeSettings(BaseSettings):
    """Configuration of the HTTP service (one model per server process).

    Attributes
    ----------
    model : bundled model name (``demo-brain``) or path to a model folder / ``model.yaml``.
    device : ``auto`` | ``cuda`` | ``cpu``.
    threshold : default probability threshold in (0, 1) for binary / heat-map models;
        ``None`` keeps the model card's default. Per-request ``?threshold=`` overrides it.
    pad_multiple : pad the model-grid volume so each spatial size is a multiple of this
        (voxels); ``None`` keeps the model card's default.
    clip_percentiles : ``(lower, upper)`` intensity percentiles (0-100) used by
        percentile normalisation; ``None`` keeps the model card's values.
    cors_origins : origins allowed by CORS (``["*"]`` for any); empty disables CORS.
    max_upload_bytes : largest accepted request body / uploaded file, bytes.
    max_voxels : largest accepted voxel count (I*J*K*channels) of an uploaded scan.
    max_archive_members : most members in an uploaded DICOM zip.
    max_unpacked_bytes : largest total uncompressed size of an uploaded archive or gzip
        stream, bytes.
    workers : number of job worker threads (bounded pool); also bounds concurrent
        synchronous predictions.
    queue_limit : most jobs waiting in the queue; beyond it submissions get HTTP 429.
    job_store : folder holding the SQLite job database, uploaded inputs and outputs.
    result_ttl_s : seconds a finished job's results are kept (then status ``expired``).
    api_keys : accepted API keys (``Authorization: Bearer <key>``); empty disables auth
        (unless admin keys are set). A job belongs to the key that submitted it: other
        keys get 404 for it (:mod:`medinfer.serve.auth`).
    admin_api_keys : keys that may read and cancel every job (``MEDINFER_ADMIN_API_KEYS``).
    """

    model_config = SettingsConfigDict(env_prefix="MEDINFER_", extra="ignore",
                                      protected_namespaces=())

    model: str = "demo-brain"
    device: Device = Device.AUTO
    threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    pad_multiple: int | None = Field(default=None, ge=1, le=1024)
    clip_percentiles: Annotated[tuple[float, float] | None, NoDecode] = None
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_upload_bytes: int = Field(default=512 * 1024**2, ge=1024)
    max_voxels: int = Field(default=256 * 1024**2, ge=1)
    max_archive_members: int = Field(default=5000, ge=1)
    max_unpacked_bytes: int = Field(default=2 * 1024**3, ge=1024)
    workers: int = Field(default=2, ge=1, le=64)
    queue_limit: int = Field(default=100, ge=1)
    job_store: Path = Path("medinfer-jobs")
    result_ttl_s: float = Field(default=24 * 3600.0, gt=0.0)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    admin_api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("cors_origins", "api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("clip_percentiles", mode="before")
    @classmethod
    def _percentiles(cls, value: Any) -> Any:
        value = _split_list(value)
        if value == []:
            return None
        return value

    @field_validator("clip_percentiles")
    @classmethod
    def _percentile_order(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not (0.0 <= value[0] < value[1] <= 100.0):
            raise ValueError(f"need 0 <= lower < upper <= 100, got {value}")
        return value


def load_settings(**overrides: Any) -> ServeSettings:
    """Read settings from the environment, then apply ``overrides`` (e.g. CLI options).

    Raises
    ------
    ConfigError
        A ``MEDINFER_*`` variable or override has an invalid value; the message names it.
    """
    from medinfer.serve.env_aliases import UNET3D_ALIASES, unet3d_settings

    aliases = unet3d_settings()  # UNET3D_* variables, checked (docs/compat/unet3d.md)
    alias_names = {f: f"UNET3D_{s}" for s, f in UNET3D_ALIASES.items() if f in aliases}
    try:
        return ServeSettings(**{**aliases,
                                **{k: v for k, v in overrides.items() if v is not None}})
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            name = alias_names.get(field.split(".")[0],
                                   f"MEDINFER_{field.split('.')[0].upper()}")
            parts.append(f"{name}: {err['msg']}")
        raise ConfigError("invalid service settings: " + "; ".join(parts)) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"invalid service settings: a list value is not valid JSON ({exc})") \
            from None
