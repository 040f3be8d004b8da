"""DIMSE node: a C-STORE SCP that runs a model on each completed series (pynetdicom).

Every received instance is written to ``<storage>/incoming/<series uid>/<sop uid>.dcm``
(temporary file, fsync, rename) and recorded in ``<storage>/state.sqlite`` *before* the
C-STORE response is sent, so an acknowledged instance survives a crash (even SIGKILL).
A series is complete when no instance arrived for ``idle_timeout_s``; it is then claimed
once (SQLite), predicted, and the results are C-STOREd to the forward destination. After a
restart, series that were receiving or interrupted are picked up again. An instance not
received before that arrives after its series was claimed reopens the series: it is
predicted again, whole, once idle (after the running prediction, if one is running), and
the new results are forwarded; a re-sent instance reopens nothing.

Associations are accepted only from the configured calling AE titles (and, when given,
IP addresses). Errors of a series (non-image SOP class, mixed geometry, unreachable
forward destination) are logged and recorded; the node stays up.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medinfer.errors import ConfigError, MedinferError
from medinfer.pacs import PacsError
from medinfer.pacs.node import predict_series
from medinfer.pacs.state import NodeState

__all__ = ["Destination", "DicomListener", "parse_destination"]

log = logging.getLogger(__name__)

_STATUS_OK = 0x0000
_STATUS_REFUSED = 0xA700  # Refused: out of resources (used for a refused address)
_STATUS_CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class Destination:
    """A C-STORE destination ``HOST:PORT:AET``."""

    host: str
    port: int
    ae_title: str


def parse_destination(value: str) -> Destination:
    """``"HOST:PORT:AET"`` -> :class:`Destination`.

    Raises
    ------
    ConfigError
        Not three fields, a port outside 1..65535 or an AE title longer than 16 characters.
    """
    parts = value.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2]:
        raise ConfigError(f"--forward: {value!r} is not HOST:PORT:AET")
    port = int(parts[1])
    if not 1 <= port <= 65535 or len(parts[2]) > 16:
        raise ConfigError(f"--forward: {value!r}: port must be 1..65535 and the AE title at "
                          "most 16 characters")
    return Destination(parts[0], port, parts[2])


def _safe(uid: str) -> str:
    return re.sub(r"[^0-9A-Za-z.]", "_", uid)[:128] or "x"


class DicomListener:
    """C-STORE SCP + series processor (see the module docstring).

    Parameters
    ----------
    storage : folder for received instances, results and ``state.sqlite``.
    model : model name or folder to run.
    options : :class:`medinfer.io.dicom_export.DicomOutputOptions`.
    forward : where results are C-STOREd (None: kept in ``<storage>/results``).
    ae_title, host, port : this node.
    allowed_aets : calling AE titles accepted (empty: any).
    allowed_hosts : peer IP addresses accepted (empty: any).
    idle_timeout_s : a series is complete after this long without a new instance.
    """

    def __init__(self, storage: Path, model: str, options: Any, *,
                 forward: Destination | None = None, ae_title: str = "MEDINFER",
                 host: str = "127.0.0.1", port: int = 11112,
                 allowed_aets: Sequence[str] = (), allowed_hosts: Sequence[str] = (),
                 idle_timeout_s: float = 10.0, device: str = "auto") -> None:
        if len(ae_title) > 16 or not ae_title.strip():
            raise ConfigError(f"--ae-title: {ae_title!r} must be 1..16 characters")
        self.storage = Path(storage)
        (self.storage / "incoming").mkdir(parents=True, exist_ok=True)
        self.state = NodeState(self.storage / "state.sqlite")
        self.model = model
        self.options = options
        self.forward = forward
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.allowed_aets = [a.strip() for a in allowed_aets]
        self.allowed_hosts = list(allowed_hosts)
        self.idle_timeout_s = idle_timeout_s
        self.device = device
        self._server: Any = None
        self._stop = threading.Event()

    # --------------------------------------------------------------------- C-STORE
    def _on_store(self, event: Any) -> int:
        peer = event.assoc.requestor
        if self.allowed_hosts and peer.address not in self.allowed_hosts:
            log.warning("C-STORE from %s refused (address not allowed)", peer.address)
            return _STATUS_REFUSED
        try:
            ds = event.dataset
            sop = str(ds.SOPInstanceUID)
            series = str(ds.SeriesInstanceUID)
            study = str(ds.get("StudyInstanceUID", ""))
        except (AttributeError, KeyError, ValueError) as exc:
            log.warning("C-STORE from %s: unreadable data set (%s)", peer.ae_title, exc)
            return _STATUS_CANNOT_UNDERSTAND
        folder = self.storage / "incoming" / _safe(series)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{_safe(sop)}.dcm"
        tmp = folder / f".{final.name}.part"
        with open(tmp, "wb") as fh:
            fh.write(event.encoded_dataset())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.state.add_instance(sop, series, study, final, folder)
        return _STATUS_OK

    def start(self) -> None:
        """Start the SCP (non-blocking) and resume interrupted series."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        self.state.reset_interrupted()
        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        if self.allowed_aets:
            ae.require_calling_aet = self.allowed_aets
        try:
            self._server = ae.start_server((self.host, self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        except OSError as exc:
            raise ConfigError(f"--port: cannot listen on {self.host}:{self.port} "
                              f"({exc.strerror or exc})") from None
        log.warning("listening as %s on %s:%d", self.ae_title, self.host, self.port)

    def stop(self) -> None:
        """Stop the processing loop and the SCP."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.state.close()

    # ------------------------------------------------------------------ processing
    def process_ready(self) -> int:
        """Process every series idle for ``idle_timeout_s``; returns how many were run."""
        n = 0
        for series, study, folder in self.state.idle_series(self.idle_timeout_s):
            if not self.state.claim(series):
                continue
            n += 1
            t0 = time.perf_counter()
            try:
                out = self.storage / "results" / _safe(series)
                if out.exists():  # a reopened series: its new results replace the old copy
                    shutil.rmtree(out)
                results = predict_series(Path(folder), series, self.model, out, self.options,
                                         device=self.device)
                if self.forward is not None:
                    self._send(results)
                final = self.state.finish(series, outputs=len(results))
                log.warning("study %s series %s: %d result(s) in %.1f s%s", study, series,
                            len(results), time.perf_counter() - t0,
                            "" if final else "; new instances arrived meanwhile: it runs "
                            "again once idle")
            except MedinferError as exc:
                log.error("study %s series %s failed: %s", study, series, exc)
                self.state.finish(series, error=str(exc))
        return n

    def _send(self, files: Sequence[Path]) -> None:
        import pydicom
        from pynetdicom import AE

        assert self.forward is not None
        datasets = [pydicom.dcmread(f) for f in files]
        ae = AE(ae_title=self.ae_title)
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
        dest = self.forward
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            raise PacsError(f"forward {dest.host}:{dest.port} ({dest.ae_title}): association "
                            "refused or destination unreachable")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = int(getattr(status, "Status", -1)) if status else -1
                if code != 0:
                    raise PacsError(f"forward {dest.ae_title}: C-STORE of {ds.SOPInstanceUID} "
                                    f"failed (status 0x{code & 0xFFFF:04X})")
        finally:
            assoc.release()

    def serve_forever(self, poll_s: float = 0.5) -> None:
        """Start, then process completed series until :meth:`stop` (or SIGTERM/SIGINT)."""
        self.start()
        try:
            while not self._stop.is_set():
                self.process_ready()
                self._stop.wait(poll_s)
        finally:
            self.stop()
