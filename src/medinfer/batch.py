"""Cohort runs: stable case ids, resumable batch runs, run manifests, sharding.

``medinfer predict`` on many inputs, :func:`run` in Python and
:func:`medinfer.distributed.distributed_inference` on a Ray cluster share this module:

1. **Plan** (:func:`plan_cases`, cheap, no pixel data): every input becomes a
   :class:`CaseSpec` with a stable **case id** (the output name), its source key, and what
   to do with it (``run``, ``skip``: complete outputs of the same source, model and
   settings exist, ``fail``: outputs of an earlier run would be replaced without
   ``--overwrite``). Ids never depend on the input order: two inputs that map to one id
   both get ``<id>-<hash of their source>``, and an existing output of *another* source
   is never replaced (the new case gets the hashed name).
2. **Process** each case to run: read, infer, write all its files atomically
   (:class:`CaseProcessor`); a failure becomes a per-case error record (``keep_going``)
   or stops the run with a :class:`~medinfer.errors.MedinferError`.
3. **Record**: ``<case>_stats.json`` names the source (path, DICOM UIDs), the model hash
   and the settings; the run manifest ``run.json`` + ``cases.csv`` in the output folder
   lists every case once (id, source, status, error, timings, outputs, model hash).

Case ids (``name_by``): ``uid`` (default) - NIfTI: the file name without ``.nii(.gz)``;
DICOM: ``PatientID_StudyDate_S<SeriesNumber>_<8 hex of sha1(SeriesInstanceUID)>``;
``description`` - DICOM SeriesDescription (else the folder name); ``path`` - the file or
folder name. Ids keep ``[A-Za-z0-9._-]`` and replace other runs of characters by ``_``.

Resuming (``skip_existing``): a case is skipped when its ``<case>_stats.json`` names the
same source, model hash and settings key and every output file it lists exists. Every
file of a case is renamed into place only after the whole case succeeded, and the stats
file lists the whole set, so a run killed at any moment is resumed exactly.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io as _io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medinfer.errors import ConfigError, MedinferError, parse_enum

if TYPE_CHECKING:
    from rich.console import Console

    from medinfer.inference.cli import CaseInput
    from medinfer.prediction import Prediction
    from medinfer.volume import Volume

log = logging.getLogger(__name__)

__all__ = [
    "CaseFailedError", "CaseProcessor", "CaseRecord", "CaseSpec", "CaseStatus", "Manifest",
    "NameBy", "OutputExistsError", "RunInfo", "case_id", "exit_code_for", "model_fingerprint",
    "plan_cases", "run", "run_local", "settings_key", "shard",
]

MANIFEST_FORMAT = "medinfer-run/1"
_ID_MAX = 64  # + "-<8 hex>" keeps names within medinfer._atomic's 80-character prefix


class NameBy(StrEnum):
    """How case ids (output names) are made; see the module docstring."""

    UID = "uid"
    DESCRIPTION = "description"
    PATH = "path"


class CaseStatus(StrEnum):
    """Status of a case in the run manifest."""

    OK = "ok"  # written by this run
    SKIPPED = "skipped"  # complete outputs of an earlier run with the same model/settings
    FAILED = "failed"


class CaseFailedError(MedinferError):
    """A case failed in a run that does not keep going (the message names the case)."""


class OutputExistsError(MedinferError):
    """Outputs of the case from an earlier run exist and would be replaced."""


# ----------------------------------------------------------------------------- ids
def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:_ID_MAX].strip("._-")


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


_HEADER_TAGS = ["PatientID", "StudyDate", "SeriesNumber", "SeriesInstanceUID",
                "StudyInstanceUID", "SeriesDescription", "Modality", "Rows", "Columns"]
_DICOM_PEEK_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, EOFError,
                      IndexError, NotImplementedError)
_PEEK_MAX_FILES = 5000


def peek_dicom_header(path: Path, series_uid: str | None = None) -> dict[str, Any]:
    """Identity fields of a DICOM case from one image file's header (no pixel data).

    Parameters
    ----------
    path : a DICOM file or a folder (searched recursively in sorted order, hidden
        entries skipped, at most 5000 files looked at).
    series_uid : take the first file of this series (``--series``), else the first image.

    Returns
    -------
    dict with ``patient_id``, ``study_date``, ``series_number`` (int or None),
    ``series_instance_uid``, ``study_instance_uid``, ``series_description``,
    ``modality`` (strings, ``""`` when absent); empty when no readable image header is
    found (the load of the case then reports why).
    """
    import pydicom

    def files() -> Iterable[Path]:
        if path.is_file():
            yield path
            return
        for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.startswith("."):
                    yield Path(dirpath) / name

    for n, f in enumerate(files()):
        if n >= _PEEK_MAX_FILES:
            break
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except _DICOM_PEEK_ERRORS:
            continue
        if "Rows" not in ds:
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if series_uid and uid != series_uid:
            continue
        number = ds.get("SeriesNumber", None)
        try:
            series_number = int(number) if number not in (None, "") else None
        except (TypeError, ValueError):
            series_number = None
        return {
            "patient_id": str(ds.get("PatientID", "") or ""),
            "study_date": str(ds.get("StudyDate", "") or ""),
            "series_number": series_number,
            "series_instance_uid": uid,
            "study_instance_uid": str(ds.get("StudyInstanceUID", "") or ""),
            "series_description": str(ds.get("SeriesDescription", "") or ""),
            "modality": str(ds.get("Modality", "") or ""),
        }
    return {}


def _path_name(case: CaseInput) -> str:
    from medinfer.inference.cli import strip_nifti_suffix

    if case.kind == "nifti":
        return strip_nifti_suffix(case.path.name)
    return case.path.name if case.path.is_dir() else case.path.stem


def case_id(case: CaseInput, header: Mapping[str, Any], name_by: NameBy | str = NameBy.UID
            ) -> str:
    """The stable id (output name) of one case, before any collision suffix.

    Parameters
    ----------
    case : the input (``kind`` ``"nifti"`` or ``"dicom"``).
    header : DICOM identity fields (:func:`peek_dicom_header`); ignored for NIfTI.
    name_by : ``uid`` | ``description`` | ``path`` (see the module docstring).

    Raises
    ------
    ConfigError
        ``name_by`` is not one of the accepted values.
    """
    how = parse_enum(NameBy, name_by, "--name-by")
    base = ""
    if case.kind == "dicom" and how is NameBy.UID and header:
        parts = [str(header.get("patient_id") or ""), str(header.get("study_date") or "")]
        if header.get("series_number") is not None:
            parts.append(f"S{header['series_number']}")
        uid = str(header.get("series_instance_uid") or "")
        parts.append(_short_hash(uid) if uid else _short_hash(str(case.path.resolve())))
        base = "_".join(_sanitise(p) for p in parts if _sanitise(p))
    elif case.kind == "dicom" and how is NameBy.DESCRIPTION:
        base = _sanitise(str(header.get("series_description") or ""))
    return base or _sanitise(_path_name(case)) or "case"


def source_key(case: CaseInput, header: Mapping[str, Any]) -> str:
    """What identifies the source across runs: ``dicom:<SeriesInstanceUID>`` or the path."""
    uid = str(header.get("series_instance_uid") or "")
    if case.kind == "dicom" and uid:
        return f"dicom:{uid}"
    return f"file:{case.path.resolve()}"


# ----------------------------------------------------------------- model and settings
def model_fingerprint(model: str) -> str:
    """``sha256:<hex>`` over the model's files (relative names and contents).

    ``model`` is a file, a folder (all non-hidden files, recursively) or a bundled model
    name (its folder). Used to tell whether earlier outputs came from the same model.

    Raises
    ------
    ModelError
        ``model`` is neither a path nor a known model name.
    """
    p = Path(model)
    if not p.exists():
        from medinfer.models.loaders import resolve_model

        p = Path(resolve_model(model)[1])
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file()
        and not any(part.startswith(".") or part == "__pycache__"
                    for part in f.relative_to(p).parts))
    for f in files:
        h.update(f"{f.name if f == p else f.relative_to(p).as_posix()}\0".encode())
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return "sha256:" + h.hexdigest()


def settings_key(settings: Mapping[str, Any]) -> str:
    """Short stable hash of the output-relevant settings (JSON, sorted keys)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class RunInfo:
    """What makes outputs comparable across runs (recorded per case and in run.json)."""

    model: str
    model_hash: str
    settings: dict[str, Any]

    @property
    def settings_key(self) -> str:
        return settings_key(self.settings)


# -------------------------------------------------------------------------- planning
@dataclass
class CaseSpec:
    """One case of a run (picklable: sent to Ray workers).

    ``action`` is ``run``, ``skip`` or ``fail`` (``error`` says why).
    """

    index: int
    path: str
    kind: str
    case_id: str
    source_key: str
    header: dict[str, Any] = field(default_factory=dict)
    action: str = "run"
    error: str = ""

    @property
    def source(self) -> CaseInput:
        from medinfer.inference.cli import CaseInput

        return CaseInput(Path(self.path), self.kind)


def shard(items: Sequence[Any], num_parts: int, part_id: int) -> list[Any]:
    """Deterministic split: items ``part_id, part_id + num_parts, ...`` (as nnU-Net).

    Raises
    ------
    ConfigError
        ``num_parts < 1`` or ``part_id`` not in ``[0, num_parts)``.
    """
    if num_parts < 1:
        raise ConfigError(f"--num-parts: expected an integer >= 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise ConfigError(f"--part-id: expected 0 <= part-id < {num_parts} (--num-parts), "
                          f"got {part_id}")
    return list(items[part_id::num_parts])


def _read_stats(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _stats_source(stats: Mapping[str, Any]) -> str:
    src = stats.get("source")
    if isinstance(src, dict) and isinstance(src.get("key"), str):
        return str(src["key"])
    # stats written before case ids existed: the input path
    return f"file:{Path(str(stats.get('input', ''))).resolve()}" if stats.get("input") else ""


def _outputs_complete(out_dir: Path, stats: Mapping[str, Any]) -> bool:
    outputs = stats.get("outputs")
    names = list(outputs.values()) if isinstance(outputs, dict) else outputs
    if not isinstance(names, list) or not names:
        return False
    return all(isinstance(n, str) and (out_dir / n).is_file() for n in names)


def plan_cases(
    cases: Sequence[CaseInput],
    output_dir: Path,
    info: RunInfo,
    *,
    series: str | None = None,
    name_by: NameBy | str = NameBy.UID,
    skip_existing: bool = False,
    overwrite: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
) -> list[CaseSpec]:
    """Ids, collisions, shard and skip decisions for ``cases`` (headers only, no pixels).

    The shard is taken from the de-duplicated case list in input order, so the parts
    ``0 .. num_parts-1`` of one input list cover every case exactly once. Ids are chosen
    over the whole list (before sharding), so every part names a case the same way.

    Raises
    ------
    ConfigError
        Bad ``name_by``, ``num_parts`` or ``part_id``.
    """
    how = parse_enum(NameBy, name_by, "--name-by")
    shard([], num_parts, part_id)  # validate early
    specs: list[CaseSpec] = []
    seen: set[str] = set()
    for case in cases:
        header = peek_dicom_header(case.path, series) if case.kind == "dicom" else {}
        key = source_key(case, header)
        if key in seen:
            log.warning("%s: the same source as an earlier input (%s); processed once",
                        case.path, key)
            continue
        seen.add(key)
        specs.append(CaseSpec(len(specs), str(case.path), case.kind, case_id(case, header, how),
                              key, header))
    # order-independent collision rule: every member of a clash gets a hashed name
    by_id: dict[str, list[CaseSpec]] = {}
    for s in specs:
        by_id.setdefault(s.case_id.lower(), []).append(s)
    for group in by_id.values():
        if len(group) > 1:
            for s in group:
                s.case_id = f"{s.case_id}-{_short_hash(s.source_key)}"
    mine = shard(specs, num_parts, part_id)
    for s in mine:
        _decide(s, output_dir, info, skip_existing=skip_existing, overwrite=overwrite)
    return mine


def _decide(s: CaseSpec, out_dir: Path, info: RunInfo, *, skip_existing: bool,
            overwrite: bool) -> None:
    stats_path = out_dir / f"{s.case_id}_stats.json"
    stats = _read_stats(stats_path) if stats_path.exists() else None
    if stats is None and not stats_path.exists():
        seg = out_dir / f"{s.case_id}_seg.nii.gz"
        if seg.exists() and not (overwrite or skip_existing):  # an output without record
            s.action = "fail"
            s.error = (f"{seg}: an output of an earlier run exists; use --overwrite to "
                       f"replace it or --continue to redo unfinished cases")
        return
    if stats is not None and _stats_source(stats) not in ("", s.source_key):
        # an output of another source holds this name: never replace it
        new_id = f"{s.case_id}-{_short_hash(s.source_key)}"
        log.warning("%s: %s belongs to another source (%s); this case is named %s",
                    s.path, stats_path.name, _stats_source(stats), new_id)
        s.case_id = new_id
        _decide(s, out_dir, info, skip_existing=skip_existing, overwrite=overwrite)
        return
    same_run = stats is not None and stats.get("model_hash") == info.model_hash \
        and stats.get("settings_key") == info.settings_key
    complete = stats is not None and _outputs_complete(out_dir, stats)
    if skip_existing and same_run and complete:
        s.action = "skip"
    elif overwrite or (skip_existing and same_run):
        s.action = "run"  # replace (or complete) this source's own earlier outputs
    else:
        s.action = "fail"
        why = ("from another model or other settings" if stats is not None and not same_run
               else "from an earlier run")
        s.error = (f"{stats_path}: outputs of this case {why} exist; use --overwrite to "
                   f"replace them" + ("" if not same_run else
                                      " or --continue to skip finished cases"))


def remove_stale_temporaries(out_dir: Path, name: str) -> None:
    """Delete temporary files a killed run left for case ``name`` (never final files)."""
    if not out_dir.is_dir():
        return
    # ".<name>_<kind>.<...>.part<suffix>" (medinfer._atomic), or "..<name>_<kind>..." that
    # earlier runs left when killed inside a writer that nested its own temporary;
    # kinds have no "_", so the temporaries of a case "<name>_x" (perhaps being written
    # by another part) never match
    mine = re.compile(rf"^\.+{re.escape(name)}_[^_.]+\..*\.part")
    for p in out_dir.iterdir():
        if mine.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)


# -------------------------------------------------------------------------- records
@dataclass
class CaseRecord:
    """One row of the run manifest."""

    id: str
    source: str
    kind: str
    status: str
    error: str = ""
    series_instance_uid: str = ""
    patient_id: str = ""
    attempts: int = 0
    worker: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    model_hash: str = ""
    settings_key: str = ""
    finished: str = ""

    @classmethod
    def for_spec(cls, spec: CaseSpec, info: RunInfo, status: CaseStatus | str, **kw: Any
                 ) -> CaseRecord:
        return cls(id=spec.case_id, source=spec.path, kind=spec.kind, status=str(status),
                   series_instance_uid=str(spec.header.get("series_instance_uid") or ""),
                   patient_id=str(spec.header.get("patient_id") or ""),
                   model_hash=info.model_hash, settings_key=info.settings_key,
                   finished=_now(), **kw)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def error_text(exc: BaseException) -> str:
    """One line for the manifest: our errors as they are, others with their type."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if isinstance(exc, MedinferError) else f"{type(exc).__name__}: {msg}"


_CSV_FIELDS = ["id", "source", "kind", "status", "error", "series_instance_uid", "patient_id",
               "attempts", "worker", "load_s", "infer_s", "export_s", "total_s", "outputs",
               "model_hash", "settings_key", "finished"]


class Manifest:
    """``run.json`` + ``cases.csv`` of one run (or one part: ``run.part<K>of<N>.json``).

    Rewritten atomically after finished cases (at most every ``interval_s`` seconds)
    and at the end; ``<case>_stats.json`` remains the truth for resuming.
    """

    def __init__(self, output_dir: Path, info: RunInfo, specs: Sequence[CaseSpec], *,
                 num_parts: int = 1, part_id: int = 0, interval_s: float = 2.0) -> None:
        self.output_dir = output_dir
        self.info = info
        suffix = "" if num_parts == 1 else f".part{part_id}of{num_parts}"
        self.json_path = output_dir / f"run{suffix}.json"
        self.csv_path = output_dir / f"cases{suffix}.csv"
        self.part = {"num_parts": num_parts, "part_id": part_id}
        self.order = {s.case_id: s.index for s in specs}
        self.records: dict[str, CaseRecord] = {}
        self.started = _now()
        self.interval_s = interval_s
        self._last = 0.0
        self._lock = threading.Lock()

    def remove_stale_temporaries(self) -> None:
        """Delete the temporaries of ``run*.json`` / ``cases*.csv`` that a killed run left.

        Only this part's own manifest names match (``.cases.csv.<random>.part.csv``), so
        another part's manifest being written next to it is never touched.
        """
        if not self.output_dir.is_dir():
            return
        mine = re.compile("^(" + "|".join(
            re.escape(f".{p.name}.") for p in (self.json_path, self.csv_path)) + r")[^.]+\.part")
        for p in self.output_dir.iterdir():
            if mine.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)

    def add(self, record: CaseRecord, *, save: bool = True) -> None:
        with self._lock:
            self.records[record.id] = record
        if save and time.monotonic() - self._last >= self.interval_s:
            self.save()

    def counts(self) -> dict[str, int]:
        c = {s.value: 0 for s in CaseStatus}
        for r in self.records.values():
            c[r.status] = c.get(r.status, 0) + 1
        c["total"] = len(self.records)
        return c

    def rows(self) -> list[CaseRecord]:
        return sorted(self.records.values(), key=lambda r: self.order.get(r.id, 1 << 30))

    def save(self, *, final: bool = False, exit_code: int | None = None) -> None:
        from medinfer import __version__
        from medinfer._atomic import write_text_atomic

        with self._lock:
            rows = self.rows()
            self._last = time.monotonic()
            doc = {
                "format": MANIFEST_FORMAT, "medinfer_version": __version__,
                "started": self.started, "updated": _now(), "finished": final,
                "model": {"source": self.info.model, "hash": self.info.model_hash},
                "settings": self.info.settings, "settings_key": self.info.settings_key,
                "part": self.part, "counts": self.counts(), "exit_code": exit_code,
                "cases": [dataclasses.asdict(r) for r in rows],
            }
            buf = _io.StringIO()
            w = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, lineterminator="\n")
            w.writeheader()
            for r in rows:
                t = r.timings_s
                infer, whole = _infer_and_total(t)
                w.writerow({
                    "id": r.id, "source": r.source, "kind": r.kind, "status": r.status,
                    "error": r.error, "series_instance_uid": r.series_instance_uid,
                    "patient_id": r.patient_id, "attempts": r.attempts, "worker": r.worker,
                    "load_s": _fmt(t.get("load")), "infer_s": _fmt(infer if t else None),
                    "export_s": _fmt(t.get("export")), "total_s": _fmt(whole if t else None),
                    "outputs": ";".join(r.outputs), "model_hash": r.model_hash,
                    "settings_key": r.settings_key, "finished": r.finished,
                })
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.csv_path, buf.getvalue())
            write_text_atomic(self.json_path, json.dumps(doc, indent=2) + "\n")


def _infer_and_total(t: Mapping[str, float]) -> tuple[float, float]:
    """(inference seconds, whole case seconds) from a Prediction's ``timings``."""
    infer = t["total"] if "total" in t else sum(
        v for k, v in t.items() if k not in ("load", "export"))
    return infer, infer + t.get("load", 0.0) + t.get("export", 0.0)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def skipped_record(spec: CaseSpec, out_dir: Path, info: RunInfo) -> CaseRecord:
    """The manifest row of a case whose complete outputs an earlier run wrote."""
    stats = _read_stats(out_dir / f"{spec.case_id}_stats.json") or {}
    outputs = stats.get("outputs") or {}
    names = list(outputs.values()) if isinstance(outputs, dict) else list(outputs)
    timings = stats.get("timings_s") if isinstance(stats.get("timings_s"), dict) else {}
    return CaseRecord.for_spec(spec, info, CaseStatus.SKIPPED,
                               outputs=[str(n) for n in names],
                               timings_s={str(k): float(v) for k, v in (timings or {}).items()})


def exit_code_for(counts: Mapping[str, int]) -> int:
    """0 when no case failed, 2 when every attempted case failed, else 3."""
    failed = counts.get(CaseStatus.FAILED.value, 0)
    if not failed:
        return 0
    done = counts.get(CaseStatus.OK.value, 0) + counts.get(CaseStatus.SKIPPED.value, 0)
    return 2 if done == 0 else 3


# ------------------------------------------------------------------------ processing
class CaseProcessor:
    """Reads, infers and writes cases with one opened model (one per device / worker).

    Parameters
    ----------
    predictor_kwargs : keyword arguments of
        :func:`medinfer.inference.batch.open_predictor` (``model``, ``device``, ...);
        picklable, so that Ray workers open their own copy.
    output_dir : the output folder (shared by all workers).
    info : model hash and settings, recorded in every ``<case>_stats.json``.
    series : ``--series`` UID for DICOM folders.
    overlay : also write ``<case>_overlay.png``.
    write_options : extra keyword arguments for
        :func:`medinfer.inference.cli.write_case`.
    opened : an already opened ``(card, predictor)`` to use instead of opening one.
    """

    def __init__(self, predictor_kwargs: Mapping[str, Any], output_dir: Path | str,
                 info: RunInfo, *, series: str | None = None, overlay: bool = False,
                 write_options: Mapping[str, Any] | None = None,
                 opened: tuple[Any, Any] | None = None) -> None:
        from medinfer.formats import open_predictor

        self.output_dir = Path(output_dir)
        self.info = info
        self.series = series
        self.overlay = overlay
        self.write_options = dict(write_options or {})
        self.device = str(predictor_kwargs.get("device", "auto"))
        self.card, self.predictor = opened or open_predictor(**predictor_kwargs)

    def load(self, spec: CaseSpec) -> tuple[Volume, float]:
        from medinfer import io

        t0 = time.perf_counter()
        volume = io.load(spec.path, series_uid=self.series)
        return volume, time.perf_counter() - t0

    def infer(self, spec: CaseSpec, volume: Volume, t_load: float,
              progress: Callable[[str, float], None] | None = None) -> Prediction:
        pred = self.predictor.predict(volume, progress=progress)
        pred.timings = {"load": t_load, **pred.timings}
        return pred

    def write(self, spec: CaseSpec, volume: Volume, pred: Prediction) -> dict[str, Path]:
        from medinfer.inference.cli import write_case

        t1 = time.perf_counter()
        remove_stale_temporaries(self.output_dir, spec.case_id)
        extra = {
            "case_id": spec.case_id,
            "source": {"key": spec.source_key, "path": spec.path, "kind": spec.kind,
                       **{k: v for k, v in spec.header.items()
                          if k != "series_description"}},
            "model_hash": self.info.model_hash,
            "settings_key": self.info.settings_key,
        }
        pred.timings["export"] = 0.0  # so that the stats file lists the stage
        paths = write_case(self.output_dir, spec.case_id, spec.source, volume, pred,
                           self.card, overlay=self.overlay, extra=extra,
                           **self.write_options)
        pred.timings["export"] = time.perf_counter() - t1
        return paths

    def process(self, spec: CaseSpec, worker: str = "") -> CaseRecord:
        """Read, infer and write one case; any failure becomes a ``failed`` record."""
        try:
            volume, t_load = self.load(spec)
            pred = self.infer(spec, volume, t_load)
            outputs = [p.name for p in self.write(spec, volume, pred).values()]
        except Exception as exc:
            log.debug("case %s failed", spec.case_id, exc_info=True)
            return CaseRecord.for_spec(spec, self.info, CaseStatus.FAILED,
                                       error=error_text(exc), attempts=1, worker=worker)
        return CaseRecord.for_spec(spec, self.info, CaseStatus.OK, attempts=1, worker=worker,
                                   timings_s={k: round(v, 4) for k, v in pred.timings.items()},
                                   outputs=outputs)


# ------------------------------------------------------------------------ local runs
@dataclass
class _Failed:
    exc: BaseException


def run_local(
    specs: Sequence[CaseSpec],
    processors: Sequence[CaseProcessor],
    manifest: Manifest,
    *,
    keep_going: bool,
    num_workers: int = 1,
    on_done: Callable[[CaseSpec, CaseRecord, Any], None] | None = None,
    progress: Callable[[CaseSpec, str, float], None] | None = None,
) -> None:
    """Process the ``run`` specs on this machine; records go to ``manifest``.

    One processor: the pipelined runner (:class:`medinfer.inference.batch.BatchRunner`,
    ``num_workers`` reader/writer threads; 0 = strictly sequential). Several processors
    (``--devices``): one thread per processor pulls cases from a shared queue.
    ``on_done(spec, record, (prediction, paths) or None)`` is called in input order (one
    processor) or as cases finish (several).

    Raises
    ------
    MedinferError
        Without ``keep_going``: the first case error (unexpected exceptions wrapped in
        :class:`CaseFailedError`); cases already finished keep their outputs.
    """
    from medinfer.inference.batch import BatchRunner

    todo = [s for s in specs if s.action == "run"]

    def record_failure(spec: CaseSpec, exc: BaseException) -> CaseRecord:
        rec = CaseRecord.for_spec(spec, manifest.info, CaseStatus.FAILED,
                                  error=error_text(exc), attempts=1,
                                  worker=f"0:{processors[0].device}")
        manifest.add(rec, save=keep_going)  # else the error is raised, nothing written
        return rec

    def raise_case(spec: CaseSpec, exc: BaseException) -> None:
        if isinstance(exc, MedinferError):
            raise exc
        raise CaseFailedError(f"case {spec.case_id} ({spec.path}): {error_text(exc)}") from exc

    if len(processors) > 1:
        _run_devices(todo, processors, manifest, keep_going=keep_going, on_done=on_done,
                     raise_case=raise_case)
        return
    proc = processors[0]

    def load(spec: CaseSpec) -> Any:
        try:
            return proc.load(spec)
        except Exception as exc:
            return _Failed(exc)

    def infer(spec: CaseSpec, loaded: Any) -> Any:
        if isinstance(loaded, _Failed):
            return loaded
        try:
            def prog(stage: str, fraction: float) -> None:
                if progress is not None:
                    progress(spec, stage, fraction)
            return proc.infer(spec, loaded[0], loaded[1], prog)
        except Exception as exc:
            return _Failed(exc)

    def write(spec: CaseSpec, loaded: Any, pred: Any) -> Any:
        if isinstance(pred, _Failed):
            return pred, None
        try:
            return proc.write(spec, loaded[0], pred), pred
        except Exception as exc:
            return _Failed(exc), None

    def done(_: int, spec: CaseSpec, res: Any) -> None:
        outputs, pred = res
        if isinstance(outputs, _Failed):
            log.debug("case %s failed", spec.case_id, exc_info=outputs.exc)
            rec = record_failure(spec, outputs.exc)
            if on_done is not None:
                on_done(spec, rec, None)
            if not keep_going:
                raise_case(spec, outputs.exc)
            return
        rec = CaseRecord.for_spec(spec, manifest.info, CaseStatus.OK, attempts=1,
                                  timings_s={k: round(v, 4) for k, v in pred.timings.items()},
                                  outputs=[p.name for p in outputs.values()],
                                  worker=f"0:{proc.device}")
        manifest.add(rec)
        if on_done is not None:
            on_done(spec, rec, (pred, outputs))

    BatchRunner(load, infer, write, on_done=done, workers=num_workers).run(todo)


def _run_devices(todo: Sequence[CaseSpec], processors: Sequence[CaseProcessor],
                 manifest: Manifest, *, keep_going: bool,
                 on_done: Callable[[CaseSpec, CaseRecord, Any], None] | None,
                 raise_case: Callable[[CaseSpec, BaseException], None]) -> None:
    import queue
    from concurrent.futures import ThreadPoolExecutor

    work: queue.SimpleQueue[CaseSpec] = queue.SimpleQueue()
    for s in todo:
        work.put(s)
    stop = threading.Event()
    first_error: list[tuple[CaseSpec, str]] = []
    lock = threading.Lock()

    def worker(proc: CaseProcessor, name: str) -> None:
        while not stop.is_set():
            try:
                spec = work.get_nowait()
            except queue.Empty:
                return
            rec = proc.process(spec, worker=name)
            manifest.add(rec, save=keep_going or rec.status != CaseStatus.FAILED)
            with lock:
                if on_done is not None:
                    on_done(spec, rec, None)
                if rec.status == CaseStatus.FAILED and not keep_going:
                    first_error.append((spec, rec.error))
                    stop.set()

    with ThreadPoolExecutor(len(processors), thread_name_prefix="medinfer-device") as pool:
        futures = [pool.submit(worker, p, f"{i}:{p.device}")
                   for i, p in enumerate(processors)]
        for f in futures:
            f.result()
    if first_error:
        spec, msg = first_error[0]
        raise CaseFailedError(f"case {spec.case_id} ({spec.path}): {msg}")


# ------------------------------------------------------------------ the predict run
class BatchResult(list[dict[str, Path]]):
    """The written paths of each case written by this run (a list, in input order),
    with ``summary`` (the dict :func:`run` returns) and ``exit_code``."""

    def __init__(self, items: Iterable[dict[str, Path]] = ()) -> None:
        super().__init__(items)
        self.summary: dict[str, Any] = {}
        self.exit_code = 0


def parse_devices(devices: str | Sequence[str] | None) -> list[str]:
    """``"cuda:0,cuda:1"`` (or a list) -> ``["cuda:0", "cuda:1"]``; each checked.

    Raises
    ------
    ConfigError
        An empty list or a device string that is not accepted.
    """
    from medinfer.models.loaders import resolve_device

    if devices is None:
        return []
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    out = [d.strip() for part in items for d in str(part).split(",") if d.strip()]
    if not out:
        raise ConfigError(f"--devices: expected a comma-separated list such as "
                          f"cuda:0,cuda:1, got {devices!r}")
    for d in out:
        resolve_device(d)
    return out


def execute_predict(
    cases: Sequence[CaseInput],
    output_dir: Path,
    *,
    predictor_kwargs: Mapping[str, Any],
    settings: Mapping[str, Any],
    series: str | None = None,
    overlay: bool = False,
    keep_going: bool | None = None,
    skip_existing: bool = False,
    overwrite: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
    num_workers: int = 1,
    name_by: NameBy | str = NameBy.UID,
    devices: str | Sequence[str] | None = None,
    ray: str | None = None,
    ray_options: Mapping[str, Any] | None = None,
    write_options: Mapping[str, Any] | None = None,
    console: Console | None = None,
    err: Console | None = None,
    verbose: bool = False,
    label_table: Callable[[str, Any], Any] | None = None,
) -> BatchResult:
    """Plan, run and record ``cases`` (the case loop of ``medinfer predict``).

    ``ray``: ``None`` runs on this machine; else a Ray address (``""`` = ``ray.init()``'s
    default: a running local cluster or a new one, ``"auto"``, ``"host:port"``);
    ``ray_options``: keyword arguments of :func:`medinfer.distributed.run_on_ray`
    (``num_gpus``, ``num_workers``, ...). See :func:`run` for the other options.

    Raises
    ------
    MedinferError
        Bad options; without ``keep_going`` the first case's error.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    out = console or Console()
    err = err or Console(stderr=True)
    if num_workers < 0:
        raise ConfigError(f"--num-workers: expected an integer >= 0, got {num_workers}")
    if skip_existing and overwrite:
        raise ConfigError("--overwrite and --continue/--skip-existing exclude each other: "
                          "choose one")
    device_list = parse_devices(devices)
    if ray is not None:
        from medinfer.distributed import import_ray

        import_ray()  # says how to install it
        if device_list:
            raise ConfigError("--devices and --ray exclude each other (Ray gives each "
                              "worker its own GPU)")
    model = str(predictor_kwargs["model"])
    info = RunInfo(model=model, model_hash=model_fingerprint(model),
                   settings={k: settings[k] for k in sorted(settings)})
    if keep_going is None:
        keep_going = len(cases) > 1
    specs = plan_cases(cases, output_dir, info, series=series, name_by=name_by,
                       skip_existing=skip_existing, overwrite=overwrite,
                       num_parts=num_parts, part_id=part_id)
    manifest = Manifest(output_dir, info, specs, num_parts=num_parts, part_id=part_id)
    manifest.remove_stale_temporaries()
    result = BatchResult()
    for s in specs:
        if s.action == "skip":
            manifest.add(skipped_record(s, output_dir, info), save=False)
            log.info("case %s: complete outputs exist, skipped", s.case_id)
        elif s.action == "fail":
            if not keep_going:
                raise OutputExistsError(s.error)
            manifest.add(CaseRecord.for_spec(s, info, CaseStatus.FAILED, error=s.error),
                         save=False)
    todo = [s for s in specs if s.action == "run"]
    processors: list[CaseProcessor] = []
    if todo and ray is None:  # open the model(s) before any progress display
        processors = [
            CaseProcessor({**predictor_kwargs, "device": d}, output_dir, info,
                          series=series, overlay=overlay, write_options=write_options)
            for d in (device_list or [str(predictor_kwargs.get("device", "auto"))])]
    if todo:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[stage]}"), TimeElapsedColumn(),
                      TextColumn("ETA"), TimeRemainingColumn(), console=err,
                      transient=True, disable=not err.is_terminal) as bar:
            overall = bar.add_task("cases", total=len(todo), stage="")
            current: dict[int, Any] = {}

            def progress(spec: CaseSpec, stage: str, fraction: float) -> None:
                if spec.index not in current:
                    current[spec.index] = bar.add_task(f"{spec.case_id}", total=1.0,
                                                       stage=stage)
                bar.update(current[spec.index], completed=fraction, stage=stage)

            t_start = time.monotonic()
            finished = [0]

            def done(spec: CaseSpec, rec: CaseRecord, extra: Any) -> None:
                tid = current.pop(spec.index, None)
                if tid is not None:
                    bar.remove_task(tid)
                bar.advance(overall)
                finished[0] += 1
                elapsed = time.monotonic() - t_start
                eta = elapsed / finished[0] * (len(todo) - finished[0])
                log.info("case %d/%d %s (%s): %s; elapsed %.0f s, ETA %.0f s", finished[0],
                         len(todo), spec.case_id, spec.path, rec.status, elapsed, eta)
                if rec.status == CaseStatus.FAILED:
                    if not keep_going:
                        return  # raised as the run's error
                    err.print(f"case {spec.case_id} ({spec.path}): failed: {rec.error}",
                              markup=False, highlight=False)
                    return
                if extra is not None:
                    pred, paths = extra
                    result.append(paths)
                    if label_table is not None:
                        out.print(label_table(spec.case_id, pred))
                    if verbose:
                        err.print("timings: " + ", ".join(
                            f"{k} {v:.2f} s" for k, v in pred.timings.items()),
                            markup=False, highlight=False)
                else:
                    result.append({"stats": output_dir / f"{spec.case_id}_stats.json"})

            try:
                if ray is not None:
                    from medinfer.distributed import run_on_ray

                    by_id = {s.case_id: s for s in todo}
                    for rec in run_on_ray(todo, predictor_kwargs, output_dir, info,
                                          address=ray, series=series, overlay=overlay,
                                          write_options=write_options,
                                          **dict(ray_options or {})):
                        manifest.add(rec)
                        done(by_id[rec.id], rec, None)
                else:
                    run_local(todo, processors, manifest, keep_going=keep_going,
                              num_workers=num_workers, on_done=done, progress=progress)
            except BaseException:
                if any(r.status != CaseStatus.FAILED for r in manifest.records.values()):
                    manifest.save(final=False)
                raise
    counts = manifest.counts()
    code = exit_code_for(counts)
    if manifest.records or specs:
        manifest.save(final=True, exit_code=code)
    result.exit_code = code
    result.summary = {
        "output_dir": str(output_dir), "manifest": str(manifest.json_path),
        "cases_csv": str(manifest.csv_path), "counts": counts, "exit_code": code,
        "model_hash": info.model_hash, "settings_key": info.settings_key,
        "part": {"num_parts": num_parts, "part_id": part_id},
        "cases": [dataclasses.asdict(r) for r in manifest.rows()],
    }
    _print_summary(out, manifest, output_dir, result)
    return result


def _print_summary(out: Console, manifest: Manifest, output_dir: Path,
                   result: BatchResult) -> None:
    from rich.table import Table

    rows = manifest.rows()
    c = manifest.counts()
    if len(rows) > 1 or c["failed"] or c["skipped"]:
        table = Table(title="cases", caption=f"{c['ok']} written, {c['skipped']} skipped "
                      f"(complete from an earlier run), {c['failed']} failed")
        for col in ("case", "status", "time (s)", "outputs / error"):
            table.add_column(col)
        for r in rows:
            table.add_row(r.id, r.status, f"{_infer_and_total(r.timings_s)[1]:.1f}"
                          if r.status == CaseStatus.OK else "",
                          r.error or f"{len(r.outputs)} files")
        out.print(table)
    out.print(f"Outputs for {len(result)} case(s) written to {output_dir.resolve()}",
              markup=False, highlight=False)
    for paths in result:
        out.print("  " + ", ".join(p.name for p in paths.values()), markup=False,
                  highlight=False)
    if rows:
        out.print(f"Run manifest: {manifest.json_path} and {manifest.csv_path.name}",
                  markup=False, highlight=False)


# ------------------------------------------------------------------------ Python API
def run(inputs: Sequence[str | os.PathLike[str]], *, model: str | None = None,
        output_dir: str | os.PathLike[str], console: Console | None = None,
        **options: Any) -> dict[str, Any]:
    """Run a model over many scans (``medinfer predict`` from Python); the summary dict.

    Parameters
    ----------
    inputs : NIfTI files, folders of NIfTI files, DICOM files or DICOM folders.
    model : model folder / ``model.yaml`` / bundled name / nnU-Net folder / MONAI bundle
        (default ``demo-brain``).
    output_dir : output folder (``<case>_seg.nii.gz``, ``<case>_stats.json``, ...,
        ``run.json``, ``cases.csv``).
    console : where tables go (default: a quiet console, nothing printed).
    **options : the options of :func:`medinfer.inference.cli.run_predict`, e.g.
        ``keep_going`` (default on for more than one case), ``skip_existing``,
        ``overwrite``, ``num_parts``, ``part_id``, ``num_workers``, ``name_by``,
        ``devices``, ``ray``, ``device``, ``tta``, ``save_probabilities``.

    Returns
    -------
    dict
        ``counts`` (``ok``, ``skipped``, ``failed``, ``total``), ``exit_code`` (0 / 3 some
        failed / 2 all failed), ``manifest`` (path of run.json), ``cases`` (manifest rows
        as dicts), ``output_dir``.

    Raises
    ------
    MedinferError
        Bad options or model; without ``keep_going`` the error of the failing case.
    """
    from rich.console import Console

    from medinfer.inference.cli import run_predict

    quiet = console or Console(file=_io.StringIO(), width=120)
    result = run_predict([Path(p) for p in inputs], model=model, output_dir=Path(output_dir),
                         console=quiet, **options)
    return dict(result.summary)
