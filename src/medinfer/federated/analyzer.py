"""The analysis a federated node runs on one request: bytes in, segmentations as bytes out.

Steps (FLAME nnU-Net analysis, seed 004), each on medinfer's public API:

1. :func:`normalise_data`: the SDK's ``data`` (``data_type="s3"``: a list of per-source
   ``{key: bytes}`` dicts; also raw bytes, ``{filename: bytes}``, nested lists) becomes a
   flat list of named payloads; anything that is not bytes is reported, not dropped.
2. :class:`~medinfer.federated.archive.SafeUnpacker` writes them under
   ``<work>/nnUNet_input`` (TARs and zips unpacked safely, refusals reported per file).
3. Preparation into ``<work>/nnUNet_output/nnunet_data_dir``: NIfTI collected (plain
   ``.nii`` gzipped), ``multi_modal=False`` -> ``<case>_0000.nii.gz``; multi-modal cases
   grouped by nnU-Net's ``_XXXX`` channel suffixes. DICOM series (medinfer's reader,
   :func:`medinfer.io.dicom.list_series`) are one case each, read straight from their files.
4. Prediction with any model medinfer opens (:func:`medinfer.formats.open_predictor`:
   medinfer model folder / bundled name, nnU-Net v2 folder, MONAI bundle) or an nnU-Net v1
   folder (:class:`medinfer.formats.nnunet_v1.NnUNetV1Predictor`), each case written by
   ``medinfer predict``'s own case writer (:func:`medinfer.inference.cli.write_case`), so
   the NIfTI label map is byte-identical to ``medinfer predict``'s ``<case>_seg.nii.gz``.
5. Output: a DICOM SEG (:func:`medinfer.io.dicom_seg.write_dicom_seg`) for a case with DICOM
   source headers, segment descriptions from a ``*.mitklabel.json`` beside the series files
   when present, else from the model card; NIfTI otherwise (the reason per case in the
   report).
6. The work folder is removed on success, failure and SIGTERM.

Result: ``{"status": "done", "dicom_seg_bytes": {"<case>.dcm": bytes}, "nifti_seg_bytes":
{"<case>.nii.gz": bytes}, "report": {...}}``; ``"status": "failed"`` with ``"reason"``
when no case could be processed.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medinfer.errors import ConfigError, MedinferError
from medinfer.federated.archive import RefusedInput, SafeUnpacker, UnpackLimits

__all__ = ["NodeConfig", "normalise_data", "run_analysis", "work_folders"]

log = logging.getLogger("medinfer.federated")

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<chan>\d{4})$")
_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


@dataclass(frozen=True)
class NodeConfig:
    """How the node analyses: the model and where its temporary folders go.

    Attributes
    ----------
    model : medinfer model folder / ``model.yaml`` / bundled name (``demo-brain``), an
        nnU-Net v2 or v1 model folder, or a MONAI bundle.
    folds : nnU-Net folds (``None``: all).
    tta : test-time augmentation (``None``: the model's default).
    multi_modal : group NIfTI files by their ``_XXXX`` channel suffix (else each file is
        one single-channel case).
    device : ``auto`` | ``cpu`` | ``cuda[:N]``.
    work_dir : base folder for the per-request private work folder (``None``: the system
        temporary folder); inside it ``nnUNet_input/`` and ``nnUNet_output/``.
    limits : archive unpacking caps.
    """

    model: str = "demo-brain"
    folds: tuple[str, ...] | None = None
    tta: bool | None = None
    multi_modal: bool = False
    device: str = "auto"
    work_dir: str | None = None
    limits: UnpackLimits = field(default_factory=UnpackLimits)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NodeConfig:
        """From ``MEDINFER_FEDERATED_MODEL``, ``..._FOLDS`` (comma list), ``..._TTA``
        (``1``/``0``), ``..._MULTI_MODAL``, ``..._DEVICE``, ``..._WORK_DIR``.

        Raises
        ------
        ConfigError
            A boolean variable that is not one of 1/0/true/false/yes/no.
        """
        e = os.environ if env is None else env
        p = "MEDINFER_FEDERATED_"
        folds = e.get(p + "FOLDS")
        return cls(model=e.get(p + "MODEL", "demo-brain"),
                   folds=tuple(f for f in folds.split(",") if f) if folds else None,
                   tta=_bool(e, p + "TTA"), multi_modal=bool(_bool(e, p + "MULTI_MODAL")),
                   device=e.get(p + "DEVICE", "auto"), work_dir=e.get(p + "WORK_DIR") or None)


def _bool(env: Mapping[str, str], key: str) -> bool | None:
    value = env.get(key)
    if value is None or value == "":
        return None
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}: {value!r} is not a boolean; use 1/0, true/false or yes/no")


# ------------------------------------------------------------------------------ input
def normalise_data(data: Any) -> tuple[list[tuple[str, bytes]], list[RefusedInput]]:
    """Flatten the SDK's ``data`` into ``[(name, bytes)]`` plus refused entries.

    Accepted: ``bytes`` / ``bytearray`` / ``memoryview`` (unnamed ones: ``input-<n>`` plus a
    suffix from the content), mappings of name -> any accepted value (nested names joined
    with ``/``), lists / tuples of them (the ``data_type="s3"`` shape: one dict per data
    source). Anything else (``None``, ``str``, numbers) is reported as refused with its type.
    """
    out: list[tuple[str, bytes]] = []
    refused: list[RefusedInput] = []

    def walk(value: Any, name: str | None) -> None:
        if isinstance(value, bytes | bytearray | memoryview):
            blob = bytes(value)
            out.append((name or f"input-{len(out) + 1}{_suffix_of(blob)}", blob))
        elif isinstance(value, Mapping):
            for k, v in value.items():
                key = str(k)
                walk(v, f"{name}/{key}" if name else key)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v, None)
        else:
            refused.append(RefusedInput(name or "data", None,
                                        f"not bytes (got {type(value).__name__})"))

    walk(data, None)
    return out, refused


def _suffix_of(blob: bytes) -> str:
    """A file suffix for an unnamed payload from its content: ``.nii.gz``, ``.nii``,
    ``.dcm`` or ``""`` (archives are recognised from their content anyway)."""
    import struct
    import zlib

    head = blob[:1024]
    if head[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob[:1 << 16], 1024)
        except zlib.error:
            return ""
        gz = ".gz"
    else:
        gz = ""
    if len(head) >= 4 and (struct.unpack("<i", head[:4])[0] in (348, 540)
                           or struct.unpack(">i", head[:4])[0] in (348, 540)):
        return ".nii" + gz
    if not gz and head[128:132] == b"DICM":
        return ".dcm"
    return ""


# -------------------------------------------------------------------------- work dirs
@contextlib.contextmanager
def work_folders(base: str | None) -> Iterator[tuple[Path, Path]]:
    """A private work folder with ``nnUNet_input`` and ``nnUNet_output``, removed on exit.

    In the main thread SIGTERM is turned into ``SystemExit`` for the duration, so the
    folder is removed on termination too (the previous handler is restored after).
    """
    root = Path(tempfile.mkdtemp(prefix="medinfer-fed-", dir=base))
    previous: Any = None
    main = threading.current_thread() is threading.main_thread()
    if main:
        def _term(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, _term)
    try:
        (root / "nnUNet_input").mkdir()
        (root / "nnUNet_output").mkdir()
        yield root / "nnUNet_input", root / "nnUNet_output"
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if main:
            signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------- cases
@dataclass
class _Case:
    name: str
    kind: str  # "nifti" | "dicom"
    files: list[Path]  # channel files (NIfTI) or [series folder] (DICOM)
    series_uid: str | None = None
    metadata: Path | None = None


def _unique(name: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"
    out, n = base, 1
    while out.casefold() in used:
        n += 1
        out = f"{base}_{n}"
    used.add(out.casefold())
    return out


def prepare_cases(files: Sequence[Path], data_dir: Path, multi_modal: bool
                  ) -> tuple[list[_Case], list[dict[str, str]]]:
    """nnU-Net input from unpacked files: NIfTI into ``data_dir`` as
    ``<case>_XXXX.nii.gz``, DICOM series one case each; ``(cases, skipped files)``."""
    from medinfer.io.dicom import list_series

    used: set[str] = set()
    cases: list[_Case] = []
    skipped: list[dict[str, str]] = []
    nifti = sorted(f for f in files if _NIFTI.search(f.name))
    groups: dict[str, list[tuple[int, Path]]] = {}
    for f in nifti:
        stem = _NIFTI.sub("", f.name)
        m = _CHANNEL.match(stem)
        if multi_modal and m:
            groups.setdefault(m["case"], []).append((int(m["chan"]), f))
        else:
            groups.setdefault(m["case"] if m else stem, []).append((0, f))
    data_dir.mkdir(parents=True, exist_ok=True)
    for stem, members in groups.items():
        chunks = [members] if multi_modal else [[m] for m in members]
        for chunk in chunks:
            name = _unique(stem, used)
            paths = []
            for chan, src in sorted(chunk):
                dst = data_dir / f"{name}_{chan:04d}.nii.gz"
                if src.name.lower().endswith(".nii"):
                    with open(src, "rb") as fi, gzip.open(dst, "wb") as fo:
                        shutil.copyfileobj(fi, fo, 1 << 20)
                else:
                    shutil.copyfile(src, dst)
                paths.append(dst)
            cases.append(_Case(name, "nifti", paths, metadata=_label_file(chunk[0][1])))
    others = [f for f in files if not _NIFTI.search(f.name)
              and not f.name.lower().endswith(".json")]
    # deepest folders first: a series is named and labelled from the folder holding it
    roots = sorted({f.parent for f in others}, key=lambda p: (-len(p.parts), str(p)))
    seen: set[str] = set()
    for folder in roots:
        try:
            series = list_series(folder)
        except MedinferError as exc:
            skipped.extend({"file": str(f.name), "reason": str(exc)} for f in others
                           if f.parent == folder)
            continue
        for s in series:
            if s.series_instance_uid in seen:
                continue
            seen.add(s.series_instance_uid)
            label = s.series_description or folder.name
            cases.append(_Case(_unique(label, used), "dicom", [folder],
                               s.series_instance_uid, _label_file(folder / "x")))
    return cases, skipped


def _label_file(beside: Path) -> Path | None:
    """``<case>.mitklabel.json`` beside a file, else the only ``*.mitklabel.json`` there."""
    stem = _NIFTI.sub("", beside.name)
    exact = beside.parent / f"{stem}.mitklabel.json"
    if exact.is_file():
        return exact
    found = sorted(beside.parent.glob("*.mitklabel.json"))
    return found[0] if len(found) == 1 else None


# ------------------------------------------------------------------------- model
def open_node_model(config: NodeConfig) -> tuple[Any, Any]:
    """``(card, predictor)`` for ``config.model`` (nnU-Net v1 folders included)."""
    from medinfer.models.nnunet_v1 import is_nnunet_v1_folder

    if is_nnunet_v1_folder(config.model):
        from medinfer.formats.nnunet_v1 import NnUNetV1Predictor

        kw: dict[str, Any] = {}
        if config.tta is not None:
            kw["tta"] = config.tta
        v1 = NnUNetV1Predictor(config.model, folds=list(config.folds) if config.folds else None,
                               device=config.device, **kw)
        return v1.card, v1
    from medinfer.formats import open_predictor

    return open_predictor(config.model, device=config.device, tta=config.tta,
                          folds=list(config.folds) if config.folds else None)


def _load_volume(case: _Case) -> Any:
    from medinfer import io
    from medinfer.formats.nnunet_cli import _load_case

    if case.kind == "dicom":
        return io.load(case.files[0], series_uid=case.series_uid)
    return _load_case(case.files)


def _run_case(case: _Case, card: Any, predictor: Any, out_dir: Path) -> dict[str, Any]:
    from medinfer.inference.cli import CaseInput, write_case
    from medinfer.io.dicom_export import DicomOutputOptions, OutputFormat

    t0 = time.perf_counter()
    volume = _load_volume(case)
    t1 = time.perf_counter()
    pred = predictor.predict(volume)
    t2 = time.perf_counter()
    dicom = case.kind == "dicom"
    opts = DicomOutputOptions(formats=frozenset({OutputFormat.DICOM_SEG}) if dicom else None,
                              seg_metadata=case.metadata if dicom else None)
    paths = write_case(out_dir, case.name, CaseInput(case.files[0], case.kind), volume, pred,
                       card, overlay=False, dicom=opts)
    t3 = time.perf_counter()
    entry: dict[str, Any] = {"case": case.name, "source": case.kind,
                             "timings_s": {"load": round(t1 - t0, 3),
                                           "predict": round(t2 - t1, 3),
                                           "write": round(t3 - t2, 3)}}
    if "dicom_seg" in paths:
        entry.update(output="dicom_seg", file=f"{case.name}.dcm", path=paths["dicom_seg"],
                     reason="DICOM source headers" + (
                         f"; segment descriptions from {case.metadata.name}" if case.metadata
                         else "; segment descriptions from the model card"))
    else:
        reason = ("no DICOM source headers (NIfTI input)" if not dicom else
                  "no DICOM SEG could be written (e.g. empty label map); NIfTI fallback")
        entry.update(output="nifti_seg", file=f"{case.name}.nii.gz", path=paths["seg"],
                     reason=reason)
    return entry


def run_analysis(data: Any, config: NodeConfig,
                 model: tuple[Any, Any] | Callable[[], tuple[Any, Any]] | None = None
                 ) -> dict[str, Any]:
    """One analysis round of the node (see the module docstring).

    Parameters
    ----------
    data : the SDK's ``data`` (see :func:`normalise_data`).
    config : :class:`NodeConfig`.
    model : an already opened ``(card, predictor)`` or a callable returning one (called only
        when there is a case to run); else opened from ``config.model``.

    Returns
    -------
    dict
        ``status`` (``done`` / ``failed``), ``dicom_seg_bytes``, ``nifti_seg_bytes``,
        ``report`` (``cases``: per-case output, reason, timings or error; ``refused``: every
        refused payload or archive member; ``skipped``: files that were neither NIfTI nor
        a readable DICOM series); ``reason`` when failed.
    """
    payloads, refused = normalise_data(data)
    result: dict[str, Any] = {"status": "done", "dicom_seg_bytes": {}, "nifti_seg_bytes": {}}
    report: dict[str, Any] = {"cases": [], "refused": [], "skipped": []}
    result["report"] = report
    with work_folders(config.work_dir) as (in_dir, out_dir):
        unpacker = SafeUnpacker(in_dir, config.limits)
        for name, blob in payloads:
            unpacker.add(name, blob)
        refused.extend(unpacker.result.refused)
        report["refused"] = [r.as_dict() for r in refused]
        cases, skipped = prepare_cases(list(unpacker.result.files), out_dir / "nnunet_data_dir",
                                       config.multi_modal)
        report["skipped"] = skipped
        if cases:
            opened = model() if callable(model) else model
            card, predictor = opened if opened is not None else open_node_model(config)
        seg_dir = out_dir / "predictions"
        for case in cases:
            try:
                entry = _run_case(case, card, predictor, seg_dir)
            except Exception as exc:  # a failing case is reported, the rest run
                log.warning("%s: failed: %s", case.name, exc)
                report["cases"].append({"case": case.name, "source": case.kind,
                                        "status": "failed",
                                        "error": f"{type(exc).__name__}: {exc}"})
                continue
            path = entry.pop("path")
            key = "dicom_seg_bytes" if entry["output"] == "dicom_seg" else "nifti_seg_bytes"
            result[key][entry["file"]] = Path(path).read_bytes()
            entry["status"] = "done"
            report["cases"].append(entry)
    if not result["dicom_seg_bytes"] and not result["nifti_seg_bytes"]:
        result["status"] = "failed"
        failed = [c for c in report["cases"] if c.get("status") == "failed"]
        result["reason"] = (
            "every case failed: " + "; ".join(f"{c['case']}: {c['error']}" for c in failed)
            if failed else "no NIfTI file or DICOM series in the input"
            + (f" ({len(refused)} input(s) refused)" if refused else ""))
    return result
