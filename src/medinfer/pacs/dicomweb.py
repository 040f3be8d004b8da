"""DICOMweb node: QIDO-RS search, WADO-RS retrieve, predict, STOW-RS back (dicomweb-client).

Authentication: HTTP basic (``user``/``password``) or a bearer ``token``; both from flags
or the environment (``MEDINFER_PACS_USER``, ``MEDINFER_PACS_PASSWORD``,
``MEDINFER_PACS_TOKEN``). Credentials are never logged or put in messages (URLs are shown
without user info).

Errors become :class:`medinfer.pacs.PacsError` with one clear message: PACS unreachable,
HTTP 401/403 (credentials), 404 / empty QIDO answer (study or series not found), STOW
failures. Results are stored only after every series of the request was processed, in one
STOW-RS request, so a failure stores nothing.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from medinfer.errors import ConfigError, InvalidImageError, MedinferError
from medinfer.pacs import PacsError
from medinfer.pacs.node import NON_IMAGE_MODALITIES, predict_series

__all__ = ["PacsAuth", "connect", "pull", "push", "run_study", "watch"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class PacsAuth:
    """Credentials (``repr`` hides them)."""

    user: str | None = None
    password: str | None = None
    token: str | None = None

    def __repr__(self) -> str:
        kind = "token" if self.token else ("basic" if self.user else "none")
        return f"PacsAuth({kind})"

    @classmethod
    def from_env(cls, user: str | None = None, password: str | None = None,
                 token: str | None = None) -> PacsAuth:
        """Flags first, then ``MEDINFER_PACS_USER`` / ``_PASSWORD`` / ``_TOKEN``."""
        return cls(user or os.environ.get("MEDINFER_PACS_USER") or None,
                   password or os.environ.get("MEDINFER_PACS_PASSWORD") or None,
                   token or os.environ.get("MEDINFER_PACS_TOKEN") or None)


def safe_url(url: str) -> str:
    """``url`` without user info (for messages and logs)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass
class Pacs:
    """A DICOMweb client and the URL it talks to (without credentials)."""

    client: Any
    url: str

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run a dicomweb-client call, mapping transport and HTTP errors to PacsError."""
        import requests

        try:
            return fn()
        except requests.exceptions.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code in (401, 403):
                raise PacsError(f"{self.url}: {what}: the PACS refused the credentials (HTTP "
                                f"{code}); check --user/--password or --token") from None
            if code == 404:
                raise PacsError(f"{self.url}: {what}: not found (HTTP 404)") from None
            raise PacsError(f"{self.url}: {what}: HTTP {code}") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise PacsError(f"{self.url}: PACS unreachable ({type(exc).__name__}); check "
                            "--url and that the server runs") from None
        except requests.exceptions.RequestException as exc:
            raise PacsError(f"{self.url}: {what}: {type(exc).__name__}") from None


def connect(url: str, auth: PacsAuth | None = None, *, timeout: float = 60.0,
            attempts: int = 2) -> Pacs:
    """A DICOMweb client for ``url`` (the DICOMweb root, e.g. ``http://host/dicom-web``).

    ``attempts``: tries per request on transient failures (connection errors, HTTP 408,
    429, 503, 504), 0.2 s apart and growing exponentially.

    Raises
    ------
    ConfigError
        ``url`` is not http(s).
    """
    import requests
    from dicomweb_client.api import DICOMwebClient

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--url: {safe_url(url)!r} is not an http(s) URL of a DICOMweb root")
    auth = auth or PacsAuth()
    session = requests.Session()
    if auth.token:
        session.headers["Authorization"] = f"Bearer {auth.token}"
    elif auth.user:
        session.auth = (auth.user, auth.password or "")
    elif parts.username:
        session.auth = (parts.username, parts.password or "")
    clean = safe_url(url)
    client = DICOMwebClient(clean.rstrip("/"), session=session, timeout=timeout)
    client.set_http_retry_params(retry=attempts > 1, max_attempts=max(1, attempts),
                                 wait_exponential_multiplier=200)
    return Pacs(client, clean)


def _value(ds_json: dict[str, Any], tag: str) -> str:
    item = ds_json.get(tag, {}).get("Value", [""])
    v = item[0] if item else ""
    return str(v) if not isinstance(v, dict) else str(v.get("Alphabetic", ""))


def list_series(pacs: Pacs, study: str | None = None,
                filters: dict[str, str] | None = None) -> list[dict[str, str]]:
    """QIDO-RS series search: ``study``, ``series``, ``modality``, ``description``."""
    def search() -> Any:
        if study:
            return pacs.client.search_for_series(study_instance_uid=study,
                                                 search_filters=filters or {})
        return pacs.client.search_for_series(search_filters=filters or {})

    found = pacs.call("QIDO-RS series search", search)
    return [{"study": _value(s, "0020000D"), "series": _value(s, "0020000E"),
             "modality": _value(s, "00080060"), "description": _value(s, "0008103E")}
            for s in found or []]


def pull(pacs: Pacs, study: str, dest: Path, series: str | None = None) -> dict[str, Path]:
    """WADO-RS retrieve the image series of ``study`` (or one ``series``) into ``dest``.

    Instances are streamed to disk one by one (``<dest>/<series uid>/<sop uid>.dcm``).

    Returns
    -------
    dict
        series UID -> folder.

    Raises
    ------
    PacsError
        Unreachable PACS, credentials refused, study/series not found.
    InvalidImageError
        ``series`` is not an image series (SEG, SR...), or the study holds none.
    """
    all_series = list_series(pacs, study)
    if not all_series:
        raise PacsError(f"{pacs.url}: study {study} not found (QIDO-RS found no series)")
    if series is not None:
        chosen = [s for s in all_series if s["series"] == series]
        if not chosen:
            raise PacsError(f"{pacs.url}: series {series} not found in study {study}; "
                            f"series: {', '.join(s['series'] for s in all_series)}")
        if chosen[0]["modality"] in NON_IMAGE_MODALITIES:
            raise InvalidImageError(f"series {series}: modality {chosen[0]['modality']} holds "
                                    "no image to run a model on")
    else:
        chosen = [s for s in all_series if s["modality"] not in NON_IMAGE_MODALITIES]
        if not chosen:
            raise InvalidImageError(f"study {study}: no image series (only "
                                    f"{', '.join(sorted({s['modality'] for s in all_series}))})")
    out: dict[str, Path] = {}
    for s in chosen:
        folder = dest / _safe(s["series"])
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()

        def fetch(uid: str = s["series"], folder: Path = folder) -> int:
            n = 0
            for ds in pacs.client.iter_series(study, uid):
                ds.save_as(folder / f"{_safe(str(ds.SOPInstanceUID))}.dcm",
                           enforce_file_format=True)
                n += 1
            return n

        n = pacs.call(f"WADO-RS retrieve of series {s['series']}", fetch)
        log.info("pulled series %s: %d instance(s) in %.1f s", s["series"], n,
                 time.perf_counter() - t0)
        out[s["series"]] = folder
    return out


def _safe(uid: str) -> str:
    return re.sub(r"[^0-9A-Za-z.]", "_", uid)[:128] or "x"


def push(pacs: Pacs, files: Sequence[Path], study: str | None = None) -> int:
    """STOW-RS the DICOM ``files`` (into ``study`` when given) in one request.

    Returns the number of instances stored.

    Raises
    ------
    PacsError
        Transport / HTTP errors, or a STOW response that lists failed instances.
    InvalidImageError
        A file is not DICOM.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(f))
        except (InvalidDicomError, OSError) as exc:
            raise InvalidImageError(f"{f}: not a DICOM file ({exc})") from None
    if not datasets:
        return 0
    resp = pacs.call("STOW-RS store",
                     lambda: pacs.client.store_instances(datasets, study_instance_uid=study))
    failed = resp.get("00081198", {}).get("Value", []) if resp is not None else []
    if failed:
        raise PacsError(f"{pacs.url}: STOW-RS: the PACS rejected {len(failed)} of "
                        f"{len(datasets)} instance(s)")
    return len(datasets)


@contextmanager
def _workdir(prefix: str) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_study(pacs: Pacs, study: str, model: str, options: Any, *,
              series: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Pull ``study`` (or one ``series``), predict each image series, STOW the results back.

    Everything is pulled and predicted first; the results are stored in one STOW-RS request
    at the end, so a failure stores nothing.

    Returns
    -------
    dict
        ``study``, ``series`` (UIDs processed), ``stored`` (instances), ``timings_s``.
    """
    t0 = time.perf_counter()
    with _workdir("medinfer-pacs-") as work:
        folders = pull(pacs, study, work / "in", series)
        t_pull = time.perf_counter() - t0
        results: list[Path] = []
        for uid, folder in folders.items():
            results += predict_series(folder, uid, model, work / "out" / _safe(uid), options,
                                      device=device)
        t_pred = time.perf_counter() - t0 - t_pull
        stored = push(pacs, results, study)
    timings = {"pull": round(t_pull, 3), "predict": round(t_pred, 3),
               "push": round(time.perf_counter() - t0 - t_pull - t_pred, 3)}
    log.warning("study %s: %d series, %d result(s) stored; timings %s", study, len(folders),
                stored, timings)
    return {"study": study, "series": list(folders), "stored": stored, "timings_s": timings}


def watch(pacs: Pacs, model: str, options: Any, state_path: Path, *,
          study: str | None = None, modality: str | None = None,
          description: str | None = None, interval_s: float = 10.0,
          max_polls: int | None = None, device: str = "auto",
          sleep: Callable[[float], None] = time.sleep) -> None:
    """Poll QIDO-RS for new image series matching the filter; process each once.

    State (series seen, done, failed) is kept in the SQLite file ``state_path``; a restart
    skips series already done or failed and retries those interrupted mid-way. Errors of a
    series are logged and recorded; the watcher stays up (PACS errors too: it polls again).
    """
    from medinfer.pacs.state import NodeState

    pattern = re.compile(description) if description else None
    state = NodeState(state_path)
    state.reset_interrupted()
    polls = 0
    try:
        while max_polls is None or polls < max_polls:
            polls += 1
            try:
                found = list_series(pacs, study, {"Modality": modality} if modality else None)
            except PacsError as exc:
                log.error("watch: %s", exc)
                found = []
            for s in found:
                if s["modality"] in NON_IMAGE_MODALITIES:
                    continue
                if pattern is not None and not pattern.search(s["description"]):
                    continue
                if state.status(s["series"]) in ("done", "failed"):
                    continue
                state.touch(s["series"], s["study"])
                if not state.claim(s["series"]):
                    continue
                try:
                    res = run_study(pacs, s["study"], model, options, series=s["series"],
                                    device=device)
                    state.finish(s["series"], outputs=int(res["stored"]))
                except PacsError as exc:  # the PACS, not the series: try again next poll
                    log.error("watch: series %s of study %s: %s (will retry)", s["series"],
                              s["study"], exc)
                    state.reset_interrupted()
                except MedinferError as exc:
                    log.error("watch: series %s of study %s failed: %s", s["series"],
                              s["study"], exc)
                    state.finish(s["series"], error=str(exc))
            if max_polls is None or polls < max_polls:
                sleep(interval_s)
    finally:
        state.close()
