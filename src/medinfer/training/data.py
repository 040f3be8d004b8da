"""Training data: pairing images with label maps, grid checks, splits, loading.

Layouts accepted by :func:`find_pairs`:

- nnU-Net style: ``images/<case>_0000.nii.gz`` (or ``<case>.nii.gz``) with
  ``labels/<case>.nii.gz`` (``imagesTr``/``labelsTr``);
- pairs in one folder: ``<case>_img.nii.gz`` with ``<case>_seg.nii.gz``;
- a CSV (``image,label[,case][,channels]`` header; channels = further channel files
  separated by ``;``) or JSON list (``[{"image":..., "label":..., "channels": [...]}]``)
  whose relative paths are relative to the list file.

Every pair is checked on the world grid (shape and voxel -> RAS+ affine), not on the
shape alone: a mask stored in another orientation or with another origin is refused.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medinfer.errors import ConfigError, GeometryError

_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
#: affine tolerance in mm (and rotation) for "same grid"
GRID_ATOL = 1e-3


@dataclass(frozen=True)
class CasePair:
    """One training case: image file (channel 0), label-map file, case id, and the files
    of further channels 1, 2, ... (nnU-Net ``<case>_0001``...; same world grid)."""

    case: str
    image: Path
    label: Path
    channels: tuple[Path, ...] = ()

    @property
    def images(self) -> tuple[Path, ...]:
        """All channel files in channel order."""
        return (self.image, *self.channels)


def _stem(path: Path) -> str | None:
    for suf in _SUFFIXES:
        if path.name.endswith(suf):
            return path.name[: -len(suf)]
    return None


def _listing(folder: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(folder.iterdir()):
        stem = _stem(p)
        if stem is not None and not p.name.startswith("."):
            out[stem] = p
    return out


def find_pairs(images: str | os.PathLike[str] | None = None,
               labels: str | os.PathLike[str] | None = None,
               cases: str | os.PathLike[str] | None = None) -> list[CasePair]:
    """Pair images with label maps (layouts in the module docstring), sorted by case id.

    Raises
    ------
    ConfigError
        Missing folders/files, an image without label (or vice versa), no case.
    """
    if cases is not None:
        return _from_list(Path(cases))
    if images is None:
        raise ConfigError("images: a folder of images is required (or a cases list)")
    img_dir = Path(images)
    if not img_dir.is_dir():
        raise ConfigError(f"images: {img_dir} is not a folder")
    imgs = _listing(img_dir)
    pairs: list[CasePair] = []
    if labels is None:
        for stem, path in imgs.items():
            if stem.endswith("_img"):
                case = stem[:-4]
                seg = next((imgs[s] for s in (f"{case}_seg",) if s in imgs), None)
                if seg is None:
                    raise ConfigError(f"images: {path.name} has no {case}_seg label map "
                                      f"in {img_dir}")
                pairs.append(CasePair(case, path, seg))
        if not pairs:
            raise ConfigError(f"images: no <case>_img/<case>_seg pairs in {img_dir} "
                              "(give labels: a folder of label maps for nnU-Net naming)")
        return pairs
    lab_dir = Path(labels)
    if not lab_dir.is_dir():
        raise ConfigError(f"labels: {lab_dir} is not a folder")
    labs = _listing(lab_dir)
    by_case: dict[str, dict[int, Path]] = {}
    for stem, path in imgs.items():
        m = re.search(r"_(\d{4})$", stem)
        case, ch = (stem[: m.start()], int(m.group(1))) if m else (stem, 0)
        by_case.setdefault(case, {})[ch] = path
    for case, chans in sorted(by_case.items()):
        path = chans[min(chans)]
        if sorted(chans) != list(range(len(chans))):
            raise ConfigError(f"images: case {case} has channels "
                              f"{[f'{c:04d}' for c in sorted(chans)]}; expected _0000.."
                              f"_{len(chans) - 1:04d} without gaps")
        if case not in labs:
            raise ConfigError(f"labels: no label map {case}.nii.gz in {lab_dir} for "
                              f"image {path.name}")
        pairs.append(CasePair(case, path, labs[case],
                              tuple(chans[c] for c in range(1, len(chans)))))
    counts = {len(p.images) for p in pairs}
    if len(counts) > 1:
        raise ConfigError(f"images: cases in {img_dir} have different channel counts "
                          f"{sorted(counts)}")
    extra = set(labs) - {p.case for p in pairs}
    if extra:
        raise ConfigError(f"labels: label maps without image in {img_dir}: "
                          f"{', '.join(sorted(extra))}")
    if not pairs:
        raise ConfigError(f"images: no NIfTI/NRRD/MHA images in {img_dir}")
    return pairs


def _from_list(path: Path) -> list[CasePair]:
    if not path.is_file():
        raise ConfigError(f"cases: {path} is not a file")
    rows: list[dict[str, Any]]
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cases: {path} is not valid JSON ({exc})") from None
        rows = data if isinstance(data, list) else []
    else:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    pairs = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not row.get("image") or not row.get("label"):
            raise ConfigError(f"cases: {path} entry {i} needs 'image' and 'label'")
        img = Path(str(row["image"]))
        lab = Path(str(row["label"]))
        img = img if img.is_absolute() else path.parent / img
        lab = lab if lab.is_absolute() else path.parent / lab
        for p in (img, lab):
            if not p.is_file():
                raise ConfigError(f"cases: {path} entry {i}: {p} does not exist")
        case = str(row.get("case") or _stem(img) or img.name)
        extra = row.get("channels") or []
        if isinstance(extra, str):  # CSV: further channel files separated by ';'
            extra = [e for e in extra.split(";") if e]
        chans = tuple(Path(str(e)) if Path(str(e)).is_absolute() else path.parent / str(e)
                      for e in extra)
        for p in chans:
            if not p.is_file():
                raise ConfigError(f"cases: {path} entry {i}: {p} does not exist")
        pairs.append(CasePair(re.sub(r"_0000$", "", case), img, lab, chans))
    if not pairs:
        raise ConfigError(f"cases: {path} lists no cases")
    return pairs


def check_same_grid(image: Any, label: Any, case: str) -> None:
    """Refuse a label map whose world grid differs from its image's.

    Parameters
    ----------
    image, label : :class:`medinfer.volume.Volume` (affine voxel -> RAS+ mm).

    Raises
    ------
    GeometryError
        Different spatial shape, or affines differing by more than ``GRID_ATOL``.
    """
    if image.spatial_shape != label.spatial_shape:
        raise GeometryError(f"case {case}: label map shape {label.spatial_shape} differs "
                            f"from the image's {image.spatial_shape}")
    diff = float(np.abs(np.asarray(image.affine) - np.asarray(label.affine)).max())
    if diff > GRID_ATOL:
        raise GeometryError(
            f"case {case}: label map is not on the image's world grid (affines differ by "
            f"{diff:.4g} mm; accepted <= {GRID_ATOL}); resample the mask onto the image")


def split_cases(case_ids: list[str], *, val_cases: list[str] | None, folds: int, fold: int,
                seed: int) -> tuple[list[str], list[str]]:
    """Training / validation case ids: a fixed list, or fold ``fold`` of a seeded k-fold.

    With a single case, it is used for both (toy runs).
    """
    ids = sorted(case_ids)
    if val_cases is not None:
        unknown = sorted(set(val_cases) - set(ids))
        if unknown:
            raise ConfigError(f"val_cases: unknown case ids {unknown}; cases are {ids}")
        train = [c for c in ids if c not in val_cases]
        return (train or list(val_cases)), list(val_cases)
    if len(ids) < 2:
        return ids, ids
    k = min(folds, len(ids))
    if fold >= k:
        raise ConfigError(f"fold: {fold} is out of range for {k} folds (0..{k - 1})")
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[fold::k])
    return [c for c in ids if c not in val], val


@dataclass
class LoadedCase:
    """A case on the model grid: image ``(1, I, J, K)`` float32 normalised, label
    ``(1, I, J, K)`` int64, affine voxel -> RAS+ mm."""

    case: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def load_source_case(pair: CasePair) -> tuple[Any, Any]:
    """Image ``(C, I, J, K)`` (one channel per file of ``pair.images``) and label map
    ``(1, I, J, K)`` as :class:`~medinfer.volume.Volume` on their source grid.

    Raises
    ------
    ConfigError
        A channel file holding more than one channel.
    GeometryError
        A channel or the label map not on channel 0's world grid.
    """
    from medinfer.io import load
    from medinfer.volume import Volume

    vols = [load(p) for p in pair.images]
    for i, v in enumerate(vols):
        if v.array.shape[0] != 1:
            raise ConfigError(f"case {pair.case}: {pair.images[i].name} holds "
                              f"{v.array.shape[0]} channels; one file per channel "
                              "(<case>_0000, <case>_0001, ...)")
        if i:
            check_same_grid(vols[0], v, f"{pair.case} (channel {i})")
    img = vols[0] if len(vols) == 1 else Volume(
        np.concatenate([np.asarray(v.array, dtype=np.float32) for v in vols]),
        vols[0].affine, vols[0].meta)
    lab = load(pair.label)
    check_same_grid(img, lab, pair.case)
    return img, lab


def load_case(pair: CasePair, *, orientation: str | None,
              spacing: Any, normalization: dict[str, Any], n_classes: int) -> LoadedCase:
    """Load, grid-check, bring to the model grid, normalise one case.

    The image has one channel per file of ``pair.images`` (``(C, I, J, K)``)."""
    from medinfer.transforms import normalize_intensity, to_model_grid

    img, lab = load_source_case(pair)
    if orientation is not None or spacing is not None:
        img, _ = to_model_grid(img, orientation, spacing, interpolation="linear")
        lab, _ = to_model_grid(lab, orientation, spacing, interpolation="nearest")
    img = normalize_intensity(img, normalization)
    label = np.rint(np.asarray(lab.array[:1])).astype(np.int64)
    bad = np.unique(label[(label < 0) | (label >= n_classes)])
    if bad.size:
        raise ConfigError(f"case {pair.case}: label values {bad[:10].tolist()} outside "
                          f"0..{n_classes - 1} (labels_map / num_classes)")
    return LoadedCase(pair.case, np.asarray(img.array, dtype=np.float32), label,
                      np.asarray(img.affine, dtype=np.float64))
