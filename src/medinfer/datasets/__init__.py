"""``medinfer.datasets``: the dataset names of the NeuroVFM data pipeline.

The same objects as :mod:`medinfer.data` (one implementation, in
:mod:`medinfer.data.dataset`), under the import path of the described interface::

    from medinfer.datasets import ImageDataset, StudyAwareBatchSampler

See ``docs/compat/neurovfm.md``.
"""

from medinfer.data.dataset import (
    DEFAULT_RANDOM_CROP,
    ImageDataset,
    StudyAwareBatchSampler,
    collate_images,
    pad_items,
)
from medinfer.data.labels import LabelKind, StudyLabels, load_study_labels

__all__ = [
    "DEFAULT_RANDOM_CROP",
    "ImageDataset",
    "LabelKind",
    "StudyAwareBatchSampler",
    "StudyLabels",
    "collate_images",
    "load_study_labels",
    "pad_items",
]
