"""nnU-Net's command lines, unchanged: ``medinfer-nnUNetv2_predict``, ``medinfer-nnUNet_predict``
and ``medinfer nnunet predict``.

The flags are nnU-Net's own (``nnunetv2/inference/predict_from_raw_data.py``,
``predict_entry_point``; ``nnunet/inference/predict_simple.py`` for v1), parsed with
:mod:`argparse` as nnU-Net parses them, so a script switches by adding the ``medinfer-``
prefix. Models are found as nnU-Net finds them: ``-d 990`` / ``-d Dataset990_Blob`` under
``$nnUNet_results`` (v2), ``-t 29`` / ``-t Task029_LiTS`` under ``$RESULTS_FOLDER/nnUNet``
(v1). Inputs are a folder of ``<case>_<XXXX><file_ending>`` files (one per channel);
outputs are written as nnU-Net writes them (``<case><file_ending>`` label maps on the
input grid; with ``--save_probabilities`` also ``<case>.npz`` (``probabilities``,
``(K, *spatial)`` float32 in SimpleITK array order, i.e. voxel axes reversed) and
``<case>.pkl``; copies of ``dataset.json`` and ``plans.json``). The scans run through
:class:`medinfer.formats.nnunet.NnUNetPredictor`. Every flag and what it does here is
listed in ``docs/compat/nnunet.md``.

nnU-Net v1 model folders (``plans.pkl`` read with the restricted unpickler of
:mod:`medinfer.models.safe_pickle`) run through
:class:`medinfer.formats.nnunet_v1.NnUNetV1Predictor` (3-D configurations); outputs
``<case>.nii.gz``, with ``-z`` also ``<case>.npz`` (``softmax``, float16, on the whole
input grid in SimpleITK array order), and a copy of ``plans.pkl``.

Exit codes: 0 success, 2 bad input (unknown flag, model or input not found, invalid
files; one message on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import typer

from medinfer.errors import ConfigError, InvalidImageError, MedinferError, ModelError

__all__ = [
    "build_parser",
    "find_v1_model",
    "find_v2_model",
    "list_cases",
    "main_v1",
    "main_v2",
    "register",
    "run",
]

_V2_CHECKPOINTS = {"checkpoint_final.pth": "final", "checkpoint_best.pth": "best"}


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see {self.prog} -h)")


class _UsageError(Exception):
    pass


def build_parser(flavour: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``nnUNetv2_predict`` (``flavour="v2"``) or ``nnUNet_predict``
    (``"v1"``), with nnU-Net's flag names, defaults and types."""
    if flavour == "v2":
        p = _Parser(prog=prog or "medinfer-nnUNetv2_predict",
                    description="nnUNetv2_predict, run by medinfer (same flags).")
        p.add_argument("-i", type=str, required=True, help="input folder (<case>_XXXX files)")
        p.add_argument("-o", type=str, required=True, help="output folder")
        p.add_argument("-d", type=str, required=True, help="dataset name or id")
        p.add_argument("-p", type=str, default="nnUNetPlans", help="plans identifier")
        p.add_argument("-tr", type=str, default="nnUNetTrainer", help="trainer class name")
        p.add_argument("-c", type=str, required=True, help="configuration")
        p.add_argument("-f", nargs="+", type=str, default=["0", "1", "2", "3", "4"],
                       help="folds (default 0 1 2 3 4)")
        p.add_argument("-step_size", type=float, default=0.5, help="window step / patch")
        p.add_argument("--disable_tta", action="store_true", help="no mirroring TTA")
        p.add_argument("--verbose", action="store_true", help="log progress")
        p.add_argument("--save_probabilities", action="store_true",
                       help="also write <case>.npz and <case>.pkl")
        p.add_argument("--continue_prediction", "--c", action="store_true",
                       help="skip cases whose outputs exist")
        p.add_argument("-chk", type=str, default="checkpoint_final.pth",
                       help="checkpoint_final.pth or checkpoint_best.pth")
        p.add_argument("-npp", type=int, default=3, help="accepted; ignored")
        p.add_argument("-nps", type=int, default=3, help="accepted; ignored")
        p.add_argument("-prev_stage_predictions", type=str, default=None,
                       help="folder with the previous stage's <case> segmentations (cascade)")
        p.add_argument("-num_parts", type=int, default=1, help="split the cases in parts")
        p.add_argument("-part_id", type=int, default=0, help="which part this call runs")
        p.add_argument("-device", type=str, default=None,
                       help="cuda, cpu or mps (default: cuda if available, else cpu)")
        p.add_argument("--disable_progress_bar", action="store_true", help="accepted")
        return p
    if flavour != "v1":
        raise ConfigError(f"flavour: {flavour!r} is not allowed; choose 'v1' or 'v2'")
    p = _Parser(prog=prog or "medinfer-nnUNet_predict",
                description="nnUNet_predict (nnU-Net v1), run by medinfer (same flags).")
    p.add_argument("-i", "--input_folder", required=True, help="input folder")
    p.add_argument("-o", "--output_folder", required=True, help="output folder")
    p.add_argument("-t", "--task_name", required=True, help="task name or id")
    p.add_argument("-tr", "--trainer_class_name", default="nnUNetTrainerV2")
    p.add_argument("-ctr", "--cascade_trainer_class_name", default="nnUNetTrainerV2CascadeFullRes")
    p.add_argument("-m", "--model", default="3d_fullres")
    p.add_argument("-p", "--plans_identifier", default="nnUNetPlansv2.1")
    p.add_argument("-f", "--folds", nargs="+", default="None")
    p.add_argument("-z", "--save_npz", action="store_true")
    p.add_argument("-l", "--lowres_segmentations", default="None")
    p.add_argument("--part_id", type=int, default=0)
    p.add_argument("--num_parts", type=int, default=1)
    p.add_argument("--num_threads_preprocessing", type=int, default=6)
    p.add_argument("--num_threads_nifti_save", type=int, default=2)
    p.add_argument("--disable_tta", action="store_true")
    p.add_argument("--overwrite_existing", action="store_true")
    p.add_argument("--mode", type=str, default="normal")
    p.add_argument("--all_in_gpu", type=str, default="None")
    p.add_argument("--step_size", type=float, default=0.5)
    p.add_argument("-chk", default="model_final_checkpoint")
    p.add_argument("--disable_mixed_precision", action="store_true")
    return p


# ========================================================================= model lookup
def _find_named(root: Path, value: str, prefix: str, what: str) -> Path:
    """``<prefix><id:03d>_<name>`` folder of ``root`` for ``value`` = id or full name."""
    if not root.is_dir():
        raise ModelError(f"{what}: results folder {root} does not exist")
    if value.isdigit():
        pattern = re.compile(rf"^{prefix}{int(value):03d}_.+$")
        hits = sorted(d for d in root.iterdir() if d.is_dir() and pattern.match(d.name))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ModelError(f"{what} {value!r}: several folders match in {root}: "
                             f"{', '.join(h.name for h in hits)}")
    elif (root / value).is_dir():
        return root / value
    have = ", ".join(sorted(d.name for d in root.iterdir() if d.is_dir())) or "none"
    raise ModelError(f"{what} {value!r}: not found in {root} (present: {have})")


def _env_folder(names: Sequence[str]) -> Path:
    for n in names:
        v = os.environ.get(n)
        if v:
            return Path(v)
    raise ConfigError(f"environment variable {' or '.join(names)} is not set; nnU-Net finds "
                      "trained models through it (export it as for nnU-Net)")


def find_v2_model(dataset: str, trainer: str, plans: str, configuration: str,
                  results: str | os.PathLike[str] | None = None) -> Path:
    """``$nnUNet_results/<DatasetXXX_Name>/<trainer>__<plans>__<configuration>``.

    ``dataset`` is the id (``990``) or the full name (``Dataset990_Blob``), as
    ``nnUNetv2_predict -d`` accepts.

    Raises
    ------
    ConfigError
        ``nnUNet_results`` not set and ``results`` not given.
    ModelError
        Dataset or model folder not found (the message lists what is there).
    """
    root = Path(results) if results is not None else _env_folder(["nnUNet_results"])
    ds = _find_named(root, dataset, "Dataset", "-d")
    folder = ds / f"{trainer}__{plans}__{configuration}"
    if not folder.is_dir():
        have = ", ".join(sorted(d.name for d in ds.iterdir() if d.is_dir())) or "none"
        raise ModelError(f"model {folder.name!r} not found in {ds} (present: {have})")
    return folder


def find_v1_model(task: str, trainer: str, plans: str, model: str,
                  results: str | os.PathLike[str] | None = None) -> Path:
    """``$RESULTS_FOLDER/nnUNet/<model>/<TaskXXX_Name>/<trainer>__<plans>`` (nnU-Net v1).

    Raises
    ------
    ConfigError
        ``RESULTS_FOLDER`` not set and ``results`` not given.
    ModelError
        Task or model folder not found.
    """
    root = Path(results) if results is not None else _env_folder(["RESULTS_FOLDER"])
    base = root / "nnUNet" / model
    t = _find_named(base, task, "Task", "-t")
    folder = t / f"{trainer}__{plans}"
    if not folder.is_dir():
        have = ", ".join(sorted(d.name for d in t.iterdir() if d.is_dir())) or "none"
        raise ModelError(f"model {folder.name!r} not found in {t} (present: {have})")
    return folder


# ============================================================================= inputs
def list_cases(in_dir: str | os.PathLike[str], file_ending: str, num_channels: int
               ) -> dict[str, list[Path]]:
    """Cases of an nnU-Net input folder: case id -> channel files in channel order.

    Files are ``<case>_<XXXX><file_ending>`` (``XXXX`` the 4-digit channel index); other
    files are ignored, as nnU-Net ignores them. Case ids sorted (nnU-Net's order, which
    ``-num_parts`` / ``-part_id`` split).

    Raises
    ------
    InvalidImageError
        Folder missing, no case, or a case missing a channel file.
    """
    d = Path(in_dir)
    if not d.is_dir():
        raise InvalidImageError(f"-i {d}: input folder not found")
    pat = re.compile(rf"^(.+)_(\d{{4}}){re.escape(file_ending)}$")
    cases: dict[str, dict[int, Path]] = {}
    for f in d.iterdir():
        m = pat.match(f.name)
        if m and f.is_file():
            cases.setdefault(m.group(1), {})[int(m.group(2))] = f
    if not cases:
        raise InvalidImageError(f"-i {d}: no <case>_XXXX{file_ending} files")
    out = {}
    for case in sorted(cases):
        chans = cases[case]
        missing = [c for c in range(num_channels) if c not in chans]
        if missing:
            raise InvalidImageError(
                f"-i {d}: case {case!r} has no file for channel(s) "
                f"{', '.join(f'{c:04d}' for c in missing)} (the model has {num_channels})")
        out[case] = [chans[c] for c in range(num_channels)]
    return out


def _load_case(files: Sequence[Path]) -> Any:
    import numpy as np

    from medinfer import io
    from medinfer.errors import GeometryError
    from medinfer.volume import Volume

    vols = [io.load(f) for f in files]
    ref = vols[0]
    for f, v in zip(files[1:], vols[1:], strict=True):
        if v.spatial_shape != ref.spatial_shape or not np.allclose(v.affine, ref.affine,
                                                                   atol=1e-4):
            raise GeometryError(f"{f}: channel grid differs from {files[0]} (shape "
                                f"{v.spatial_shape} vs {ref.spatial_shape}, or affine)")
    return Volume(np.concatenate([v.array for v in vols]), ref.affine, dict(ref.meta))


# ============================================================================ writing
def _properties(volume: Any, pred: Any, predictor: Any) -> dict[str, Any]:
    """The ``<case>.pkl`` properties nnU-Net writes beside ``<case>.npz``: SimpleITK
    geometry (LPS), ``spacing`` in SimpleITK array order, ``shape_before_cropping`` in
    the plans' transposed order (as nnU-Net stores it). The crop entries
    (``bbox_used_for_cropping``, ``shape_after_cropping_and_before_resampling``) are not
    written."""
    import numpy as np

    from medinfer.io import affine_ras_to_lps

    aff = affine_ras_to_lps(volume.affine)
    spacing = [float(s) for s in volume.spacing]
    direction = (aff[:3, :3] / np.asarray(spacing)[None, :]).ravel().tolist()
    shape = [int(s) for s in volume.spatial_shape]
    tf = [int(t) for t in predictor.folder.plans.get("transpose_forward", [0, 1, 2])]
    return {
        "sitk_stuff": {"spacing": tuple(spacing), "origin": tuple(float(v) for v in aff[:3, 3]),
                       "direction": tuple(direction)},
        "spacing": spacing[::-1],
        "shape_before_cropping": [shape[::-1][t] for t in tf],
    }


def _write_case(out_dir: Path, case: str, ending: str, volume: Any, pred: Any,
                predictor: Any, save_probabilities: bool) -> None:
    import pickle

    import numpy as np

    from medinfer import io
    from medinfer._atomic import atomic_path

    io.save(pred.label, out_dir / f"{case}{ending}")
    if save_probabilities and pred.probabilities is not None:
        probs = np.ascontiguousarray(pred.probabilities.array.transpose(0, 3, 2, 1),
                                     dtype=np.float32)
        with atomic_path(out_dir / f"{case}.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, probabilities=probs)
        with atomic_path(out_dir / f"{case}.pkl") as tmp:
            tmp.write_bytes(pickle.dumps(_properties(volume, pred, predictor)))


# =============================================================================== run
def _v2(args: argparse.Namespace) -> int:
    import logging

    from medinfer._atomic import write_text_atomic
    from medinfer.formats.nnunet import NnUNetPredictor

    log = logging.getLogger("medinfer.nnunet")
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        raise ConfigError(f"-part_id {args.part_id} / -num_parts {args.num_parts}: need "
                          "num_parts >= 1 and 0 <= part_id < num_parts")
    if args.chk not in _V2_CHECKPOINTS:
        raise ConfigError(f"-chk: {args.chk!r} is not allowed; choose "
                          f"{' or '.join(_V2_CHECKPOINTS)}")
    device = args.device or "auto"
    if device == "mps":
        raise ConfigError("-device: 'mps' is not supported; choose cpu or cuda")
    folder = find_v2_model(args.d, args.tr, args.p, args.c)
    predictor = NnUNetPredictor(folder, folds=args.f, checkpoint=_V2_CHECKPOINTS[args.chk],
                                device=device, tta=not args.disable_tta,
                                step_size=args.step_size,
                                save_probabilities=args.save_probabilities)
    ending = str(predictor.folder.dataset.get("file_ending", ".nii.gz"))
    cases = list_cases(args.i, ending, predictor.folder.num_input_channels)
    mine = list(cases)[args.part_id::args.num_parts]
    prev_dir = Path(args.prev_stage_predictions) if args.prev_stage_predictions else None
    if predictor.folder.previous_stage is not None and prev_dir is None:
        raise ConfigError(f"-c {args.c} is a cascade: give the {predictor.folder.previous_stage} "
                          "predictions with -prev_stage_predictions DIR")
    if prev_dir is not None:
        if predictor.folder.previous_stage is None:
            raise ConfigError(f"-prev_stage_predictions: -c {args.c} is not a cascade "
                              "configuration (no previous_stage in plans.json)")
        missing = [c for c in mine if not (prev_dir / f"{c}{ending}").is_file()]
        if missing:
            raise InvalidImageError(f"-prev_stage_predictions {prev_dir}: no segmentation for "
                                    f"case(s) {', '.join(missing[:10])} (<case>{ending})")
    out_dir = Path(args.o)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "dataset.json", json.dumps(predictor.folder.dataset, indent=4))
    write_text_atomic(out_dir / "plans.json", json.dumps(predictor.folder.plans, indent=4))
    if args.continue_prediction:
        def done(c: str) -> bool:
            have = (out_dir / f"{c}{ending}").is_file()
            return have and (not args.save_probabilities or (out_dir / f"{c}.npz").is_file())
        skipped = [c for c in mine if done(c)]
        mine = [c for c in mine if c not in skipped]
        if skipped:
            log.info("--continue_prediction: %d case(s) already done", len(skipped))
    from medinfer import io

    for case in mine:
        volume = _load_case(cases[case])
        prev = io.load(prev_dir / f"{case}{ending}") if prev_dir is not None else None
        pred = predictor.predict(volume, previous_stage=prev)
        _write_case(out_dir, case, ending, volume, pred, predictor, args.save_probabilities)
        log.info("%s: %s", case, out_dir / f"{case}{ending}")
    return 0


def _v1(args: argparse.Namespace) -> int:
    import logging
    import shutil

    import numpy as np

    from medinfer._atomic import atomic_path
    from medinfer.formats.nnunet_v1 import NnUNetV1Predictor

    log = logging.getLogger("medinfer.nnunet")
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        raise ConfigError(f"--part_id {args.part_id} / --num_parts {args.num_parts}: need "
                          "num_parts >= 1 and 0 <= part_id < num_parts")
    cascade = args.model == "3d_cascade_fullres"
    lowres_segs = None if args.lowres_segmentations == "None" else Path(
        args.lowres_segmentations)
    if cascade and lowres_segs is None and (args.part_id, args.num_parts) != (0, 1):
        raise ConfigError("-m 3d_cascade_fullres without -l: --part_id / --num_parts are not "
                          "supported (as in nnU-Net v1); run -m 3d_lowres first and pass its "
                          "output folder with -l")
    trainer = args.cascade_trainer_class_name if cascade else args.trainer_class_name
    folder = find_v1_model(args.task_name, trainer, args.plans_identifier, args.model)
    lowres_model = find_v1_model(args.task_name, args.trainer_class_name,
                                 args.plans_identifier, "3d_lowres") \
        if cascade and lowres_segs is None else None
    # `medinfer nnunet predict --folds 0 1` arrives as "0,1" (medinfer.cli joins the values)
    folds = None if args.folds == "None" or args.folds == ["None"] else [
        f for v in args.folds for f in str(v).split(",") if f]
    predictor = NnUNetV1Predictor(folder, folds=folds, checkpoint=args.chk,
                                  tta=not args.disable_tta, step_size=args.step_size,
                                  save_probabilities=args.save_npz,
                                  lowres_model_dir=lowres_model)
    if lowres_segs is not None and not predictor.v1.is_cascade:
        raise ConfigError(f"-l {lowres_segs}: {predictor.v1.trainer_name} ({args.model}) is not "
                          "a cascade model; -l belongs to -m 3d_cascade_fullres")
    cases = list_cases(args.input_folder, ".nii.gz", predictor.v1.num_input_channels)
    mine = list(cases)[args.part_id::args.num_parts]
    out_dir = Path(args.output_folder)
    if lowres_segs is not None:  # as v1: every case's <case>.nii.gz must be there
        missing = [c for c in cases if not (lowres_segs / f"{c}.nii.gz").is_file()]
        if missing:
            raise InvalidImageError(f"-l {lowres_segs}: no low-resolution segmentation for "
                                    f"case(s) {', '.join(missing[:10])} (<case>.nii.gz)")
    elif predictor.v1.is_cascade:  # v1 predicts the 3d_lowres stage first, into here
        lowres_segs = out_dir / "3d_lowres_predictions"
        _v1_lowres_stage(predictor, cases, lowres_segs, args.overwrite_existing)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("plans.pkl", "postprocessing.json"):  # the copies v1 writes
        if (folder / name).is_file():
            with atomic_path(out_dir / name) as tmp:
                shutil.copyfile(folder / name, tmp)
    if not args.overwrite_existing:
        mine = [c for c in mine if not ((out_dir / f"{c}.nii.gz").is_file() and (
            not args.save_npz or (out_dir / f"{c}.npz").is_file()))]
    from medinfer import io

    for case in mine:
        volume = _load_case(cases[case])
        prev = io.load(lowres_segs / f"{case}.nii.gz") if lowres_segs is not None else None
        pred = predictor.predict(volume, previous_stage=prev)
        io.save(pred.label, out_dir / f"{case}.nii.gz")
        if args.save_npz and pred.probabilities is not None:
            soft = np.ascontiguousarray(pred.probabilities.array.transpose(0, 3, 2, 1),
                                        dtype=np.float16)
            with atomic_path(out_dir / f"{case}.npz") as tmp:
                with open(tmp, "wb") as fh:
                    np.savez_compressed(fh, softmax=soft)
        log.info("%s: %s", case, out_dir / f"{case}.nii.gz")
    return 0


def _v1_lowres_stage(predictor: Any, cases: dict[str, list[Path]], out_dir: Path,
                     overwrite: bool) -> None:
    """``nnUNet_predict -m 3d_cascade_fullres`` without ``-l``: the ``3d_lowres`` model
    predicts every case into ``<output>/3d_lowres_predictions/<case>.nii.gz`` first (with
    copies of its ``plans.pkl`` / ``postprocessing.json``), existing files kept unless
    ``--overwrite_existing``, as v1's ``predict_simple`` does."""
    import shutil

    from medinfer import io
    from medinfer._atomic import atomic_path

    low = predictor.lowres_predictor()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("plans.pkl", "postprocessing.json"):
        if (low.v1.path / name).is_file():
            with atomic_path(out_dir / name) as tmp:
                shutil.copyfile(low.v1.path / name, tmp)
    for case, files in cases.items():
        if overwrite or not (out_dir / f"{case}.nii.gz").is_file():
            io.save(low.predict(_load_case(files)).label, out_dir / f"{case}.nii.gz")


def _detect(argv: Sequence[str]) -> str:
    flags = set(argv)
    if flags & {"-d", "-c", "-device", "-num_parts", "-part_id", "-npp", "-nps"}:
        return "v2"
    if flags & {"-t", "--task_name", "-m", "--model", "-z", "--save_npz"}:
        return "v1"
    raise _UsageError("cannot tell the nnU-Net version from the flags: give the v2 flags "
                      "(-d DATASET -c CONFIGURATION) or the v1 flags (-t TASK -m MODEL)")


def run(argv: Sequence[str], flavour: str = "auto", prog: str | None = None) -> int:
    """Run one nnU-Net style prediction command; returns the exit code.

    Parameters
    ----------
    argv : the flags, exactly as for ``nnUNetv2_predict`` / ``nnUNet_predict``.
    flavour : ``v2``, ``v1`` or ``auto`` (from the flags: ``-d``/``-c`` v2, ``-t``/``-m`` v1).

    Returns
    -------
    0 on success, 2 on bad input (message on stderr).
    """
    args_list = list(argv)
    try:
        fl = _detect(args_list) if flavour == "auto" and not {"-h", "--help"} & set(args_list) \
            else flavour
        if fl == "auto":
            fl = "v2"
        parser = build_parser(fl, prog)
        args = parser.parse_args(args_list)
        return _v2(args) if fl == "v2" else _v1(args)
    except (_UsageError, MedinferError) as exc:
        sys.stderr.write(f"{prog or 'medinfer nnunet predict'}: error: {exc}\n")
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        sys.stderr.write(f"{prog or 'medinfer nnunet predict'}: error: "
                         f"{exc.strerror or exc}: {exc.filename}\n")
        return 2


def main_v2(argv: Sequence[str] | None = None) -> None:
    """Console script ``medinfer-nnUNetv2_predict``."""
    raise SystemExit(run(sys.argv[1:] if argv is None else argv, "v2",
                         "medinfer-nnUNetv2_predict"))


def main_v1(argv: Sequence[str] | None = None) -> None:
    """Console script ``medinfer-nnUNet_predict``."""
    raise SystemExit(run(sys.argv[1:] if argv is None else argv, "v1",
                         "medinfer-nnUNet_predict"))


def register(app: typer.Typer) -> None:
    """Add ``medinfer nnunet predict`` (nnU-Net's flags, v1 or v2, passed through)."""
    group = typer.Typer(help="nnU-Net drop-in commands (nnU-Net's own flags).",
                         no_args_is_help=True)

    @group.command("predict", context_settings={
        "allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
    def predict(ctx: typer.Context) -> None:
        """nnUNetv2_predict / nnUNet_predict flags, verbatim (-h for the list)."""
        code = run(list(ctx.args), "auto", "medinfer nnunet predict")
        if code:
            raise SystemExit(code)

    app.add_typer(group, name="nnunet")
