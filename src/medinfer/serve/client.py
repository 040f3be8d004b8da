"""Python client of the medinfer HTTP service.

Example
-------
>>> client = InferenceClient("http://127.0.0.1:8000", api_key="secret")   # doctest: +SKIP
>>> job_id = client.submit_inference("scan.nii.gz")                      # doctest: +SKIP
>>> results = client.wait_for_results(timeout=300)                       # doctest: +SKIP
>>> paths = client.download_results("out/")                              # doctest: +SKIP

Every method raises :class:`InferenceAPIError` (with ``status``, ``type``, ``message``)
when the server answers with an error body, :class:`TimeoutError` when a wait runs out.
File names written by :meth:`InferenceClient.download_results` are checked (plain names,
no folders) and written atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TERMINAL = {"succeeded", "failed", "cancelled", "expired"}
_WS_CHUNK = 1024 * 1024


class InferenceAPIError(Exception):
    """The server refused a request.

    Attributes
    ----------
    status : HTTP status code (or the ``status`` of a WebSocket error event).
    type : error type from the body (``InvalidImageError``, ``QueueFull``...).
    message : human-readable message from the server.
    retry_after : seconds from ``Retry-After`` (429 / 503), else ``None``.
    """

    def __init__(self, status: int, type_: str, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} {type_}: {message}")
        self.status = status
        self.type = type_
        self.message = message
        self.retry_after = retry_after


class JobFailedError(InferenceAPIError):
    """A job ended ``failed``, ``cancelled`` or ``expired`` instead of ``succeeded``."""


class InferenceClient:
    """Client for one medinfer server.

    Parameters
    ----------
    base_url : e.g. ``"http://127.0.0.1:8000"``.
    api_key : sent as ``Authorization: Bearer <api_key>`` when given.
    timeout : per-request timeout in seconds (uploads and sync predictions included).
    max_retries : how often a submission refused with 429 (queue full) or 503 (model
        loading) is retried after the server's ``Retry-After`` (capped at 30 s).
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 600.0,
                 max_retries: int = 3) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.max_retries = max(0, int(max_retries))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.last_job_id: str | None = None

    # ------------------------------------------------------------------ basics
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _raise_for(resp: httpx.Response) -> None:
        if resp.status_code < 400:
            return
        try:
            err = resp.json().get("error", {})
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            err = {}
        retry = resp.headers.get("Retry-After")
        raise InferenceAPIError(
            resp.status_code, str(err.get("type", "HTTPError")),
            str(err.get("message", resp.text[:500])),
            float(retry) if retry and retry.replace(".", "", 1).isdigit() else None)

    def _request(self, method: str, url: str, retry: bool = False, **kw: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1 if retry else 1):
            resp = self._http.request(method, url, **kw)
            if retry and resp.status_code in (429, 503) and attempt < self.max_retries:
                delay = resp.headers.get("Retry-After", "1")
                time.sleep(min(30.0, float(delay) if delay.isdigit() else 1.0))
                continue
            self._raise_for(resp)
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    def _job(self, job_id: str | None) -> str:
        jid = job_id or self.last_job_id
        if not jid:
            raise ValueError("no job id given and no job submitted by this client yet")
        return jid

    def health(self) -> dict[str, Any]:
        """``GET /health/ready``; raises InferenceAPIError(503) while not ready."""
        return self._request("GET", "/health/ready").json()

    def model_card(self) -> dict[str, Any]:
        """The served model's card (first entry of ``GET /v1/models``)."""
        return self._request("GET", "/v1/models").json()["models"][0]

    # ----------------------------------------------------------------- predict
    def predict(self, scan: str | os.PathLike[str], *, threshold: float | None = None,
                return_binary: bool = False,
                output_path: str | os.PathLike[str] | None = None) -> Any:
        """Synchronous prediction (``POST /v1/predict``).

        Returns the JSON summary (dict), or with ``return_binary`` the label map NIfTI:
        written to ``output_path`` (atomically) and its Path returned, else the bytes.
        """
        params: dict[str, Any] = {}
        if threshold is not None:
            params["threshold"] = threshold
        if return_binary:
            params["return_binary"] = "true"
        p = Path(scan)
        with open(p, "rb") as fh:
            resp = self._request("POST", "/v1/predict", retry=True, params=params,
                                 files={"file": (p.name, fh, "application/octet-stream")})
        if not return_binary:
            return resp.json()
        if output_path is None:
            return resp.content
        from medinfer._atomic import write_bytes_atomic

        return write_bytes_atomic(output_path, resp.content)

    # -------------------------------------------------------------------- jobs
    def submit_inference(self, scan: str | os.PathLike[str] | None = None,
                         config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
                         *, scan_path: str | os.PathLike[str] | None = None) -> str:
        """Submit a scan as a job (``POST /api/v1/inference``); returns the job id.

        ``scan`` (or ``scan_path``, the PIVOT name) is the scan file. ``config`` is a YAML
        file path (medinfer job keys, or a PIVOT ``inference.yaml``) or a mapping
        (``threshold``, ``save_probabilities``, ``detection``). A full queue (429) is
        retried ``max_retries`` times after ``Retry-After``.
        """
        import yaml

        if (scan is None) == (scan_path is None):
            raise TypeError("submit_inference: give the scan as scan or scan_path (one of them)")
        p = Path(scan if scan is not None else scan_path)  # type: ignore[arg-type]
        cfg: bytes | None = None
        if isinstance(config, Mapping):
            cfg = yaml.safe_dump(dict(config)).encode()
        elif config is not None:
            cfg = Path(config).read_bytes()
        with open(p, "rb") as fh:
            files: dict[str, Any] = {"file": (p.name, fh, "application/octet-stream")}
            if cfg is not None:
                files["config"] = ("config.yaml", cfg, "application/yaml")
            for attempt in range(self.max_retries + 1):
                fh.seek(0)
                resp = self._http.post("/api/v1/inference", files=files)
                if resp.status_code in (429, 503) and attempt < self.max_retries:
                    delay = resp.headers.get("Retry-After", "1")
                    time.sleep(min(30.0, float(delay) if delay.isdigit() else 1.0))
                    continue
                break
        self._raise_for(resp)
        self.last_job_id = str(resp.json()["job_id"])
        return self.last_job_id

    def status(self, job_id: str | None = None) -> dict[str, Any]:
        """``GET /api/v1/inference/{id}``: status, progress (percent), stage."""
        return self._request("GET", f"/api/v1/inference/{self._job(job_id)}").json()

    def results(self, job_id: str | None = None) -> dict[str, Any]:
        """``GET /api/v1/inference/{id}/results`` (409 while not finished)."""
        return self._request("GET", f"/api/v1/inference/{self._job(job_id)}/results").json()

    def cancel(self, job_id: str | None = None) -> dict[str, Any]:
        """``DELETE /api/v1/inference/{id}``."""
        return self._request("DELETE", f"/api/v1/inference/{self._job(job_id)}").json()

    def wait_for_results(self, job_or_timeout: str | float | None = None,
                         timeout: float | None = None, job_id: str | None = None,
                         poll_interval: float = 0.25) -> dict[str, Any]:
        """Poll the job until it ends; return its results.

        Both call styles work: ``wait_for_results(job_id, timeout=300)`` (PIVOT) and
        ``wait_for_results(timeout=300, job_id=...)`` / ``wait_for_results(300)``; without a
        job id the last submitted job is used. ``timeout`` defaults to 600 s.

        Raises
        ------
        TimeoutError : not finished within ``timeout`` seconds.
        JobFailedError : the job ended ``failed`` / ``cancelled`` / ``expired``.
        """
        if isinstance(job_or_timeout, str):
            if job_id is not None and job_id != job_or_timeout:
                raise TypeError("wait_for_results: two different job ids given")
            job_id = job_or_timeout
        elif job_or_timeout is not None:
            if timeout is not None:
                raise TypeError("wait_for_results: timeout given twice")
            timeout = float(job_or_timeout)
        timeout = 600.0 if timeout is None else float(timeout)
        jid = self._job(job_id)
        deadline = time.monotonic() + timeout
        interval = max(0.01, poll_interval)
        while True:
            st = self.status(jid)
            if st["status"] == "succeeded":
                return self.results(jid)
            if st["status"] in _TERMINAL:
                err = st.get("error") or {}
                raise JobFailedError(409, str(err.get("type", st["status"])),
                                     f"job {jid} {st['status']}: {err.get('message', '')}")
            if time.monotonic() + interval > deadline:
                raise TimeoutError(f"job {jid} not finished after {timeout} s "
                                   f"(status {st['status']}, {st.get('progress', 0)} %)")
            time.sleep(interval)
            interval = min(interval * 1.5, 2.0)

    def download_results(self, first: str | os.PathLike[str] | None = None,
                         output_dir: str | os.PathLike[str] | None = None,
                         job_id: str | None = None) -> list[Path]:
        """Download every result file of a succeeded job into ``output_dir``.

        Both call styles work: ``download_results(job_id, output_dir="results/")`` (PIVOT)
        and ``download_results("results/", job_id)``: a first argument that is a job id
        (32 hex digits, not an existing path) is the job, otherwise the folder.
        Returns the written paths. Names come from the server but are checked (a plain
        file name, no folders); each file is written atomically.
        """
        from medinfer._atomic import atomic_path

        if first is not None:
            text = os.fspath(first)
            if re.fullmatch(r"[0-9a-f]{32}", text) and not Path(text).exists():
                if job_id is not None and job_id != text:
                    raise TypeError("download_results: two different job ids given")
                job_id = text
            elif output_dir is None:
                output_dir = first
            else:  # download_results(folder, job_id) positionally
                job_id, output_dir = os.fspath(output_dir), first
        if output_dir is None:
            raise TypeError("download_results: output_dir is required")
        jid = self._job(job_id)
        res = self.results(jid)
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for f in res.get("files", []):
            name = str(f["name"])
            if not _SAFE_NAME.match(name) or ".." in name:
                raise InferenceAPIError(502, "UnsafeFileName",
                                        f"server sent an unsafe file name {name!r}")
            with atomic_path(out / name) as tmp, open(tmp, "wb") as fh, \
                    self._http.stream("GET", f"/api/v1/inference/{jid}/files/{name}") as r:
                if r.status_code >= 400:
                    r.read()
                    self._raise_for(r)
                for chunk in r.iter_bytes():
                    fh.write(chunk)
            written.append(out / name)
        return written

    # ------------------------------------------------------------------ stream
    def stream(self, scan_or_job: str | os.PathLike[str], *,
               config: Mapping[str, Any] | None = None,
               timeout: float = 600.0) -> Iterator[dict[str, Any]]:
        """Follow a job over ``WS /api/v1/inference/stream``; yields JSON events.

        ``scan_or_job`` is a path to a scan (submitted over the socket) or a job id
        (32 hex digits). Iteration ends after the final event (``completed`` with
        ``result``, ``failed``, ``cancelled``) or an ``error`` event; raises
        :class:`TimeoutError` if no event arrives within ``timeout`` seconds.
        """
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        url = re.sub(r"^http", "ws", self.base_url) + "/api/v1/inference/stream"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        text = str(scan_or_job)
        ws = connect(url, additional_headers=headers, open_timeout=timeout,
                     max_size=64 * 1024 * 1024)
        try:
            try:
                if re.fullmatch(r"[0-9a-f]{32}", text) and not Path(text).exists():
                    ws.send(json.dumps({"job_id": text}))
                else:
                    data = Path(text).read_bytes()
                    ws.send(json.dumps({"action": "submit", "size": len(data),
                                        "config": dict(config or {})}))
                    for i in range(0, len(data), _WS_CHUNK):
                        ws.send(data[i:i + _WS_CHUNK])
            except ConnectionClosed:
                pass  # the server refused early; its error event is read below
            for _ in range(1_000_000):  # bounded: the server ends the stream
                try:
                    msg = ws.recv(timeout=timeout)
                except TimeoutError:
                    raise TimeoutError(f"no event from the server in {timeout} s") from None
                except ConnectionClosed:
                    return
                event = json.loads(msg)
                if event.get("job_id"):
                    self.last_job_id = str(event["job_id"])
                yield event
                if event.get("event") in ("completed", "failed", "cancelled", "expired",
                                          "error"):
                    return
        finally:
            with contextlib.suppress(ConnectionClosed):
                ws.close()
