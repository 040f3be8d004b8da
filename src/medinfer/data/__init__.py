"""Data pipeline for training foundation models on head CT and brain MRI.

Load any scan (:func:`load_image`), bring it onto the training grid
(:func:`prepare_for_inference`: RPI, 1 x 1 x 4 mm, CT windows / MRI percentiles,
per-token background mask), cut it into 4 x 16 x 16 tokens (:func:`tokenize`,
:func:`detokenize`), cache it as uint8 (:class:`CacheManager`), and serve it to PyTorch
(:class:`ImageDataset`, :func:`collate_images`, :class:`StudyAwareBatchSampler`) with
study labels (:func:`load_study_labels`). See ``docs/data_pipeline.md``.

Torch-dependent names (the dataset, collate and sampler) are imported on first use, so
cache-building worker processes do not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medinfer.data.cache import BuildReport, CacheManager
from medinfer.data.labels import LabelKind, StudyLabels, load_study_labels
from medinfer.data.metadata import DatasetMetadata, ImageEntry, Mode
from medinfer.data.prepare import (
    CT_WINDOWS,
    ImageArrays,
    PrepareConfig,
    PreparedImage,
    PreparedVolume,
    View,
    as_volume,
    load_image,
    prepare_for_inference,
    prepare_volume,
    window_names,
)
from medinfer.data.tokens import PATCH_SIZE, TOKEN_LENGTH, Tokens, detokenize, tokenize

if TYPE_CHECKING:
    from medinfer.data.dataset import (
        DEFAULT_RANDOM_CROP,
        ImageDataset,
        StudyAwareBatchSampler,
        collate_images,
        pad_items,
    )

_LAZY = {
    "DEFAULT_RANDOM_CROP",
    "ImageArrays",
    "ImageDataset",
    "StudyAwareBatchSampler",
    "collate_images",
    "pad_items",
}

__all__ = [
    "CT_WINDOWS",
    "DEFAULT_RANDOM_CROP",
    "PATCH_SIZE",
    "TOKEN_LENGTH",
    "BuildReport",
    "CacheManager",
    "DatasetMetadata",
    "ImageArrays",
    "ImageDataset",
    "ImageEntry",
    "LabelKind",
    "Mode",
    "PrepareConfig",
    "PreparedImage",
    "PreparedVolume",
    "StudyAwareBatchSampler",
    "StudyLabels",
    "Tokens",
    "View",
    "as_volume",
    "collate_images",
    "detokenize",
    "load_image",
    "load_study_labels",
    "pad_items",
    "prepare_for_inference",
    "prepare_volume",
    "tokenize",
    "window_names",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from medinfer.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'medinfer.data' has no attribute {name!r}")
