"""PyTorch dataset of prepared images, a collate function and a study-aware batch sampler.

Each item is one image of a data folder (see :mod:`medinfer.data.metadata`), read from
the uint8 cache (fast) or prepared on the fly, optionally randomly cropped, augmented
and tokenised into ``(4, 16, 16)`` patches. All randomness comes from
``numpy.random.default_rng([seed, epoch, index])``: an item is the same whichever
worker loads it, and changes with :meth:`ImageDataset.set_epoch`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medinfer.data.cache import CacheManager
from medinfer.data.labels import StudyLabels, load_study_labels
from medinfer.data.metadata import DatasetMetadata, ImageEntry, Mode
from medinfer.data.prepare import PrepareConfig, View, load_image, prepare_volume_or_reason
from medinfer.data.tokens import PATCH_SIZE, tokenize
from medinfer.errors import ConfigError, InvalidImageError

log = logging.getLogger(__name__)

#: gamma range of intensity augmentation (log-uniform)
_GAMMA_RANGE = (0.8, 1.25)
#: crop size in tokens (d, h, w) of ``random_crop=True``: 8 x 4 mm x 4 slices = 128 mm deep,
#: 12 x 16 mm = 192 mm in-plane (most of an adult head, so crops cut off only part of it)
DEFAULT_RANDOM_CROP: tuple[int, int, int] = (8, 12, 12)


def _parse_random_crop(random_crop: Any) -> tuple[int, int, int] | None:
    if random_crop is None or random_crop is False:
        return None
    if random_crop is True:
        return DEFAULT_RANDOM_CROP
    if isinstance(random_crop, (str, bytes)) or not isinstance(random_crop, Sequence):
        raise ConfigError(
            f"random_crop: {random_crop!r}; use True (crop {DEFAULT_RANDOM_CROP} tokens), "
            "False/None (no crop) or 3 positive token counts (d, h, w)"
        )
    try:
        rc = tuple(int(v) for v in random_crop)
    except (TypeError, ValueError):
        rc = ()
    if len(rc) != 3 or any(v < 1 for v in rc):
        raise ConfigError(f"random_crop: expected 3 positive token counts, got {random_crop!r}")
    return (rc[0], rc[1], rc[2])


def _window_probs(
    probs: Mapping[str, float] | Sequence[float] | None, names: Sequence[str]
) -> np.ndarray:
    if probs is None:
        return np.full(len(names), 1.0 / len(names))
    if isinstance(probs, Mapping):
        unknown = sorted(set(probs) - set(names))
        if unknown:
            raise ConfigError(f"ct_window_probs: unknown window(s) {unknown}; use {list(names)}")
        p = np.array([float(probs.get(n, 0.0)) for n in names])
    else:
        p = np.asarray([float(v) for v in probs])
        if p.shape != (len(names),):
            raise ConfigError(
                f"ct_window_probs: expected {len(names)} probabilities for {list(names)}, "
                f"got {len(p)}"
            )
    if np.any(p < 0) or not np.isfinite(p).all() or p.sum() <= 0:
        raise ConfigError(f"ct_window_probs: {p.tolist()} must be non-negative with a positive sum")
    return p / p.sum()


class ImageDataset(Dataset[dict[str, Any] | None]):
    """Images of a data folder as training items.

    Parameters
    ----------
    data_dir : data folder (``raw/``, ``metadata.json``, ``processed/``).
    use_cache : read the uint8 cache (must be built; images recorded unusable are left
        out). If False, images are loaded and prepared on every access (items of
        unusable images are None; :func:`collate_images` drops them).
    ct_window_probs : probability of each CT window (``brain``, ``blood``, ``bone``), a
        mapping or a sequence in that order; None = uniform. One window is drawn per item.
    random_crop : maximal size in tokens ``(d, h, w)``; larger images are cropped at a
        random token-aligned position. ``True`` = :data:`DEFAULT_RANDOM_CROP`
        ``(8, 12, 12)`` tokens (128 x 192 x 192 mm); ``False`` or None = whole images.
    augment : random left-right flip (p = 0.5, along the axis that runs left-right for
        the image's view: ``w`` for axial/coronal, ``d`` for sagittal) and random gamma
        ``v ** g`` with ``g`` log-uniform in [0.8, 1.25] (keeps 0 and 1 fixed).
    tokenize : return ``(N, 1024)`` tokens; else the ``(1, D, H, W)`` volume.
    study_labels : :class:`StudyLabels` or a CSV/JSON path; None = no labels.
    metadata : dataset metadata; read from ``<data_dir>/metadata.json`` if None.
    config : preparation parameters (must match the cache).
    seed : base seed of all randomness.
    missing_label : ``"error"`` (default) or ``"skip"`` images of studies without a label.

    Items
    -----
    dict with
        ``img``: float32 tensor ``(N, 1024)`` tokens (or ``(1, D, H, W)``), values in [0, 1];
        ``coords``: int64 ``(N, 3)`` token coordinates ``(d, h, w)`` (tokenised only);
        ``filtered``: bool ``(N,)`` True = background token (or ``(d, h, w)`` grid);
        ``padding``: bool ``(N,)`` all False, ``num_tokens``: int64 scalar (tokenised
        only; True / the real count after batch padding);
        ``size``: int64 ``(3,)`` token grid size;
        ``path``: source path relative to the data folder;
        ``label``: tensor (float32 scalar / ``(K,)`` / int64) -- the key is present only
        when ``study_labels`` is given, so torch's default collate never meets a None;
        ``study``, ``mode`` (``"ct"``/``"mri"``), ``window`` (CT window name, or
        ``"mri"``), ``view``.

    Batches
    -------
    ``DataLoader(dataset, batch_size=..., shuffle=...)`` and
    ``DataLoader(dataset, batch_sampler=StudyAwareBatchSampler(...))`` work with torch's
    default collate: the loader fetches each batch through :meth:`__getitems__`, which pads
    the items to the batch's largest token count (:func:`pad_items`), giving ``img``
    ``(B, N_max, 1024)``, ``coords`` ``(B, N_max, 3)``, ``filtered`` / ``padding``
    ``(B, N_max)`` (padded tokens are background and padding).

    Raises
    ------
    ConfigError
        Bad options, missing labels (with ``missing_label="error"``), or ``use_cache``
        with an unbuilt cache.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        use_cache: bool = True,
        ct_window_probs: Mapping[str, float] | Sequence[float] | None = None,
        random_crop: bool | Sequence[int] | None = None,
        augment: bool = False,
        tokenize: bool = True,
        study_labels: StudyLabels | str | os.PathLike[str] | None = None,
        *,
        metadata: DatasetMetadata | None = None,
        config: PrepareConfig | None = None,
        seed: int = 0,
        missing_label: str = "error",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.metadata = metadata if metadata is not None else DatasetMetadata.load(self.data_dir)
        self.config = config or PrepareConfig()
        self.use_cache = bool(use_cache)
        self.augment = bool(augment)
        self.tokenize = bool(tokenize)
        self.seed = int(seed)
        self.epoch = 0
        self._ct_names = tuple(self.config.ct_windows)
        self._ct_probs = _window_probs(ct_window_probs, self._ct_names)
        self.random_crop = _parse_random_crop(random_crop)
        if study_labels is None or isinstance(study_labels, StudyLabels):
            self.labels = study_labels
        else:
            self.labels = load_study_labels(study_labels)
        if missing_label not in ("error", "skip"):
            raise ConfigError(f"missing_label: {missing_label!r}; use 'error' or 'skip'")

        entries = list(self.metadata.images)
        self.cache: CacheManager | None = None
        if self.use_cache:
            self.cache = CacheManager(self.data_dir, metadata=self.metadata, config=self.config)
            usable = []
            for e in entries:
                try:
                    meta = self.cache.entry_meta(e.study, e.image)
                except InvalidImageError:
                    raise ConfigError(
                        f"use_cache: {e.study}/{e.image} is not cached; run "
                        f"`medinfer data cache {self.data_dir}` first"
                    ) from None
                if meta.get("config_digest") != self.config.digest():
                    raise ConfigError(
                        f"use_cache: the cache of {e.study}/{e.image} was built with other "
                        "preparation parameters; rebuild it"
                    )
                if meta.get("status") == "ok":
                    usable.append(e)
            entries = usable
        if self.labels is not None:
            unlabelled = sorted({e.study for e in entries if e.study not in self.labels})
            if unlabelled and missing_label == "error":
                raise ConfigError(
                    f"study_labels: no label for {len(unlabelled)} studies, e.g. {unlabelled[:5]}; "
                    "pass missing_label='skip' to leave them out"
                )
            if unlabelled:
                log.warning("leaving out %d studies without a label", len(unlabelled))
            entries = [e for e in entries if e.study in self.labels]
        self.entries: list[ImageEntry] = entries

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.entries)

    @property
    def study_ids(self) -> list[str]:
        """Study of each item, by index (used by :class:`StudyAwareBatchSampler`)."""
        return [e.study for e in self.entries]

    def set_epoch(self, epoch: int) -> None:
        """Change the random draws of every item (crops, flips, gamma, window)."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    # ------------------------------------------------------------------ loading
    def _load(
        self, entry: ImageEntry, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, str, str] | None:
        """Return (volume (D,H,W) float32, background grid uint8, window, view)."""
        if entry.mode == Mode.CT.value:
            window = self._ct_names[int(rng.choice(len(self._ct_names), p=self._ct_probs))]
        else:
            window = "mri"
        if self.cache is not None:
            meta = self.cache.entry_meta(entry.study, entry.image)
            vol = self.cache.load_image(entry.study, entry.image, window)[0]
            bg = self.cache.load_mask(entry.study, entry.image)
            return vol, bg, window, str(meta["view"])
        volume = load_image(self.data_dir / entry.path)
        prepared = prepare_volume_or_reason(volume, entry.mode, config=self.config)
        if isinstance(prepared, str):
            log.warning("%s/%s unusable: %s", entry.study, entry.image, prepared)
            return None
        return prepared.channels[window], prepared.background, window, prepared.view

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        entry = self.entries[index]
        rng = self._rng(index)
        loaded = self._load(entry, rng)
        if loaded is None:
            return None
        vol, bg, window, view = loaded
        if self.random_crop is not None:
            starts = []
            for a in range(3):
                extra = bg.shape[a] - self.random_crop[a]
                starts.append(int(rng.integers(0, extra + 1)) if extra > 0 else 0)
            sl_t = tuple(
                slice(s, s + min(c, n))
                for s, c, n in zip(starts, self.random_crop, bg.shape, strict=True)
            )
            sl_v = tuple(
                slice(t.start * p, t.stop * p) for t, p in zip(sl_t, PATCH_SIZE, strict=True)
            )
            vol, bg = vol[sl_v], bg[sl_t]
        if self.augment:
            if rng.random() < 0.5:
                lr_axis = 0 if view == View.SAGITTAL.value else 2
                vol, bg = np.flip(vol, axis=lr_axis), np.flip(bg, axis=lr_axis)
            gamma = math.exp(rng.uniform(math.log(_GAMMA_RANGE[0]), math.log(_GAMMA_RANGE[1])))
            vol = np.power(vol, np.float32(gamma), dtype=np.float32)
        vol = np.clip(np.ascontiguousarray(vol, dtype=np.float32), 0.0, 1.0)
        bg = np.ascontiguousarray(bg)
        item: dict[str, Any] = {
            "path": entry.path,
            "study": entry.study,
            "mode": entry.mode,
            "window": window,
            "view": view,
            "size": torch.tensor(bg.shape, dtype=torch.int64),
        }
        if self.labels is not None:
            item["label"] = torch.from_numpy(np.asarray(self.labels.get(entry.study)))
        if self.tokenize:
            tok = tokenize(vol, bg)
            item["img"] = torch.from_numpy(tok.tokens)
            item["coords"] = torch.from_numpy(tok.coords)
            item["filtered"] = torch.from_numpy(tok.background)
            item["padding"] = torch.zeros(tok.tokens.shape[0], dtype=torch.bool)
            item["num_tokens"] = torch.tensor(tok.tokens.shape[0], dtype=torch.int64)
        else:
            item["img"] = torch.from_numpy(vol)[None]
            item["filtered"] = torch.from_numpy(bg.astype(bool))
        return item

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The items of one batch, padded to a common size (:func:`pad_items`).

        ``torch.utils.data.DataLoader`` calls this for every batch (``batch_size`` or
        ``batch_sampler``), so its default collate stacks items with different token
        counts. Unusable images (None items, on-the-fly preparation only) are left out.
        """
        return pad_items([self[int(i)] for i in indices])


def pad_items(batch: Sequence[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Pad the items of one batch to a common size, so that they stack.

    Items that are None (unusable images prepared on the fly) are dropped.

    Tokenised items (``img`` ``(N, 1024)``) are padded at the end to the largest ``N``:
    ``img`` 0, ``coords`` 0, ``filtered`` True (background), ``padding`` True. Volumes
    (``img`` ``(1, D, H, W)``) are padded with 0 at the end of each axis to the largest
    shape, ``filtered`` ``(d, h, w)`` with True. ``size`` and ``num_tokens`` keep the real
    size.

    Raises
    ------
    ConfigError
        Every item of the batch is None, or items mix tokens and volumes.
    """
    items = [b for b in batch if b is not None]
    if not items:
        raise ConfigError("collate: every image of the batch was unusable")
    tokenised = ["coords" in it for it in items]
    out: list[dict[str, Any]] = []
    if all(tokenised):
        nmax = max(int(it["img"].shape[0]) for it in items)
        for it in items:
            n = int(it["img"].shape[0])
            extra = nmax - n
            if extra == 0:
                out.append(it)
                continue
            p = dict(it)
            p["img"] = torch.cat([it["img"], it["img"].new_zeros((extra, it["img"].shape[1]))])
            p["coords"] = torch.cat([it["coords"], it["coords"].new_zeros((extra, 3))])
            p["filtered"] = torch.cat([it["filtered"], torch.ones(extra, dtype=torch.bool)])
            p["padding"] = torch.cat([it["padding"], torch.ones(extra, dtype=torch.bool)])
            out.append(p)
    elif not any(tokenised):
        dmax = np.array([it["img"].shape[1:] for it in items]).max(axis=0)
        gmax = [int(v) // p for v, p in zip(dmax, PATCH_SIZE, strict=True)]
        for it in items:
            p = dict(it)
            img = torch.zeros((1, *dmax.tolist()), dtype=torch.float32)
            d, h, w = it["img"].shape[1:]
            img[:, :d, :h, :w] = it["img"]
            filt = torch.ones(gmax, dtype=torch.bool)
            fd, fh, fw = it["filtered"].shape
            filt[:fd, :fh, :fw] = it["filtered"]
            p["img"], p["filtered"] = img, filt
            out.append(p)
    else:
        raise ConfigError("collate: the batch mixes tokenised items and volumes")
    return out


def collate_images(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Collate items of :class:`ImageDataset` with different token counts / shapes.

    The same as ``torch.utils.data.default_collate(pad_items(batch))`` (what a plain
    ``DataLoader`` over an :class:`ImageDataset` yields, through
    :meth:`ImageDataset.__getitems__`); usable as an explicit ``collate_fn``.

    Returns
    -------
    dict
        Tokenised items: ``img`` float32 ``(B, N_max, 1024)`` zero-padded, ``coords``
        int64 ``(B, N_max, 3)`` (padding 0), ``filtered`` bool ``(B, N_max)`` (padding
        True), ``padding`` bool ``(B, N_max)`` True at padded positions,
        ``num_tokens`` int64 ``(B,)``.
        Volumes: ``img`` ``(B, 1, D_max, H_max, W_max)`` zero-padded at the end of each
        axis, ``filtered`` ``(B, d_max, h_max, w_max)`` (padding True), no ``coords``.
        Both: ``size`` int64 ``(B, 3)``; ``label`` stacked (only when the dataset has
        labels); ``path``, ``study``, ``mode``, ``window``, ``view`` lists of strings.

    Raises
    ------
    ConfigError
        Every item of the batch is None, or items mix tokens and volumes.
    """
    from torch.utils.data import default_collate

    return dict(default_collate(pad_items(batch)))


class StudyAwareBatchSampler(Sampler[list[int]]):
    """Batches of one study each; studies (not images) distributed across DDP ranks.

    Per epoch (``numpy.random.default_rng([seed, epoch])``, identical on every rank):

    1. the studies are shuffled (or kept sorted with ``shuffle=False``), and the images
       inside each study too;
    2. each study becomes one batch holding all its images -- the batch size varies with
       the images per study; a study with more than ``batch_size`` images is split into
       consecutive batches of at most ``batch_size`` images (all of that study);
    3. studies are dealt to ranks in that order, each to the rank with the fewest
       batches so far (ties: fewest images, then lowest rank), so a study lives on
       exactly one rank;
    4. ranks with fewer batches than the busiest rank split their largest batches
       (halves, still one study each) until the counts are equal, so DDP ranks step
       together and every image appears exactly once per epoch. Only when that is
       impossible (too few images) are batches repeated (warning) or, with
       ``drop_last=True``, the surplus dropped.

    Parameters
    ----------
    dataset : anything with ``study_ids`` (study per index), e.g. :class:`ImageDataset`.
    batch_size : largest number of images in a batch (caps a large study).
    shuffle : shuffle studies (and images within a study) each epoch.
    seed : shuffling seed (the same on every rank).
    num_replicas, rank : DDP world size and rank; default from ``torch.distributed`` when
        initialised, else 1 and 0.
    drop_last : see step 4.

    Raises
    ------
    ConfigError
        ``batch_size < 1``, ``rank`` outside ``[0, num_replicas)``, or an empty dataset.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size: expected >= 1, got {batch_size}")
        if num_replicas is None or rank is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            if num_replicas is None:
                num_replicas = dist.get_world_size() if ready else 1
            if rank is None:
                rank = dist.get_rank() if ready else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"rank: {rank} is not in [0, {num_replicas}) (num_replicas)")
        studies: dict[str, list[int]] = {}
        for idx, sid in enumerate(dataset.study_ids):
            studies.setdefault(str(sid), []).append(idx)
        if not studies:
            raise ConfigError("StudyAwareBatchSampler: the dataset is empty")
        self.dataset = dataset
        self.studies = studies
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (new order); also calls ``dataset.set_epoch`` if it exists."""
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)

    def rank_batches(self) -> list[list[list[int]]]:
        """The batches of every rank for this epoch (``[rank][batch] -> indices``)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        names = sorted(self.studies)
        if self.shuffle:
            names = [names[i] for i in rng.permutation(len(names))]
        r = self.num_replicas
        per_rank: list[list[list[int]]] = [[] for _ in range(r)]
        images = [0] * r
        for name in names:
            idx = list(self.studies[name])
            if self.shuffle:
                idx = [idx[i] for i in rng.permutation(len(idx))]
            chunks = [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
            target = min(range(r), key=lambda k: (len(per_rank[k]), images[k], k))
            per_rank[target].extend(chunks)
            images[target] += len(idx)
        want = max(len(b) for b in per_rank)
        for batches in per_rank:
            while len(batches) < want:
                pos = max(range(len(batches)), key=lambda k: len(batches[k]), default=-1)
                if pos < 0 or len(batches[pos]) < 2:
                    break
                b = batches[pos]
                batches[pos : pos + 1] = [b[: len(b) // 2], b[len(b) // 2 :]]
        short = [k for k in range(r) if len(per_rank[k]) < want]
        if short:
            if self.drop_last:
                least = min(len(b) for b in per_rank)
                per_rank = [b[:least] for b in per_rank]
            else:
                everything = [b for batches in per_rank for b in batches]
                log.warning(
                    "StudyAwareBatchSampler: %d images for %d ranks; repeating batches on "
                    "rank(s) %s so every rank has %d",
                    sum(len(b) for b in everything),
                    r,
                    short,
                    want,
                )
                for n, k in enumerate(short):
                    own = per_rank[k] or [everything[n % len(everything)]]
                    per_rank[k] = per_rank[k] + [
                        own[i % len(own)] for i in range(want - len(per_rank[k]))
                    ]
        return per_rank

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.rank_batches()[self.rank])

    def __len__(self) -> int:
        return len(self.rank_batches()[self.rank])
