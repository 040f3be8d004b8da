"""The FastAPI application: health, model card, sync predict, durable jobs, WebSocket.

Build it with :func:`create_app` (``medinfer serve`` and ``uvicorn medinfer.serve:app``
both do). The model is loaded in a background thread at start-up, so
``/health/live`` answers at once and ``/health/ready`` turns 200 once the model is
loaded and the job store is writable; job workers start then.

Endpoints (see ``docs/serving.md`` and ``/docs``)::

    GET    /health/live                       process is up
    GET    /health/ready                      model loaded, job store writable (else 503)
    GET    /health                            the same (UNet3D / PIVOT name)
    GET    /v1/models                         the model card
    POST   /v1/predict                        multipart ``file``; JSON summary, or the label
                                              map NIfTI with ``?return_binary=true``
    POST   /api/v1/inference                  multipart ``file`` (+ ``config`` YAML) -> job
    GET    /api/v1/inference/{job_id}         status, progress %
    GET    /api/v1/inference/{job_id}/results summary + file list
    GET    /api/v1/inference/{job_id}/files/{name}
    DELETE /api/v1/inference/{job_id}         cancel
    WS     /api/v1/inference/stream           submit or subscribe; JSON progress events
    GET    /metrics                           Prometheus text format
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
from fastapi import Depends, FastAPI, File, Query, UploadFile, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect, WebSocketState

from medinfer import __version__
from medinfer.errors import MedinferError
from medinfer.serve.auth import AuthFirstMiddleware, Principal, principal_for
from medinfer.serve.engine import (
    MAX_CONFIG_BYTES,
    Engine,
    JobConfig,
    ModelEngine,
    jsonable,
    parse_job_config,
)
from medinfer.serve.errors import (
    ApiError,
    error_body,
    error_response,
    error_responses,
    install_error_handlers,
    status_for,
)
from medinfer.serve.jobs import JobManager, results_body
from medinfer.serve.metrics import MetricsMiddleware, ServiceMetrics
from medinfer.serve.settings import ServeSettings, load_settings
from medinfer.serve.store import Job, JobStatus, JobStore, QueueFullError
from medinfer.serve.uploads import Limits, check_upload, load_checked, save_upload

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_FORM_SLACK = 1024 * 1024 + MAX_CONFIG_BYTES  # multipart envelope + config part
_WS_CHUNK = 1024 * 1024
_WS_IDLE_S = 60.0
_WS_MAX_S = 6 * 3600.0

_MEDIA = {".json": "application/json", ".gz": "application/gzip"}


class EngineHolder:
    """Loads the engine once in a background thread; readiness and errors for /health."""

    def __init__(self, factory: Callable[[], Engine]) -> None:
        self._factory = factory
        self._engine: Engine | None = None
        self.error: str | None = None
        self.loaded = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, on_loaded: Callable[[], None] | None = None) -> None:
        def _load() -> None:
            try:
                self._engine = self._factory()
            except MedinferError as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                log.error("model could not be loaded: %s", self.error)
            except Exception as exc:  # report, keep the process alive for /health
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("model could not be loaded")
            finally:
                self.loaded.set()
            if self._engine is not None and on_loaded is not None:
                on_loaded()

        self._thread = threading.Thread(target=_load, name="medinfer-model-load", daemon=True)
        self._thread.start()

    @property
    def engine(self) -> Engine | None:
        return self._engine

    def require(self) -> Engine:
        """The engine, or ApiError 503 (with Retry-After) while loading / after failure."""
        if self._engine is not None:
            return self._engine
        if self.error:
            raise ApiError(503, "ModelUnavailable", f"the model failed to load: {self.error}")
        raise ApiError(503, "ModelLoading", "the model is still loading; retry shortly",
                       {"Retry-After": "2"})

    def wait(self) -> Engine:
        """Block until loaded (for job workers); raises RuntimeError if loading failed."""
        self.loaded.wait()
        if self._engine is None:
            raise RuntimeError(f"model not available: {self.error}")
        return self._engine


class BodyLimitMiddleware:
    """Refuse request bodies above ``limit`` bytes with 413, counting while streaming.

    A ``Content-Length`` above the limit is refused before reading; a chunked body is
    cut off as soon as the count passes the limit (whatever the app answered then is
    replaced by the 413).
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await error_response(400, "BadRequest", "invalid Content-Length header")(
                        scope, receive, send)
                    return
        too_large = error_response(
            413, "PayloadTooLarge",
            f"request body larger than {self.limit} bytes (MEDINFER_MAX_UPLOAD_BYTES)")
        if declared is not None and declared > self.limit:
            await too_large(scope, receive, send)
            return
        state = {"received": 0, "exceeded": False, "started": False}

        async def _receive() -> dict[str, Any]:
            msg: dict[str, Any] = await receive()
            if msg["type"] == "http.request":
                state["received"] += len(msg.get("body", b""))
                if state["received"] > self.limit:
                    state["exceeded"] = True
                    raise _BodyTooLarge()
            return msg

        async def _send(msg: dict[str, Any]) -> None:
            if state["exceeded"] and not state["started"]:
                return
            if msg["type"] == "http.response.start":
                state["started"] = True
            await send(msg)

        try:
            await self.app(scope, _receive, _send)
        except _BodyTooLarge:
            pass
        if state["exceeded"] and not state["started"]:
            await too_large(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _limits(settings: ServeSettings) -> Limits:
    return Limits(max_upload_bytes=settings.max_upload_bytes, max_voxels=settings.max_voxels,
                  max_unpacked_bytes=settings.max_unpacked_bytes,
                  max_archive_members=settings.max_archive_members)


def _default_engine_factory(settings: ServeSettings) -> Callable[[], Engine]:
    def factory() -> Engine:
        return ModelEngine(settings.model, settings.device.value, threshold=settings.threshold,
                           pad_multiple=settings.pad_multiple,
                           clip_percentiles=settings.clip_percentiles)

    return factory


def create_app(settings: ServeSettings | None = None,
               engine_factory: Callable[[], Engine] | None = None) -> FastAPI:
    """Build the service app.

    Parameters
    ----------
    settings : service settings; ``None`` reads ``MEDINFER_*`` from the environment.
    engine_factory : returns the loaded :class:`Engine`; default loads
        ``settings.model`` with :class:`ModelEngine`. Called once, in a background thread
        at start-up.

    Raises
    ------
    ConfigError : invalid settings.
    """
    settings = settings or load_settings()
    limits = _limits(settings)
    metrics = ServiceMetrics()
    holder = EngineHolder(engine_factory or _default_engine_factory(settings))
    store_box: dict[str, Any] = {}
    predict_limiter = anyio.CapacityLimiter(settings.workers)

    def _store() -> JobStore:
        store = store_box.get("store")
        if store is None:
            raise ApiError(503, "StoreUnavailable", "the job store is not open")
        return store  # type: ignore[no-any-return,unused-ignore]

    def _manager() -> JobManager:
        manager = store_box.get("manager")
        if manager is None:
            raise ApiError(503, "StoreUnavailable", "the job manager is not running")
        return manager  # type: ignore[no-any-return,unused-ignore]

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        store = JobStore(settings.job_store)
        tmp_root = Path(settings.job_store) / "tmp"
        shutil.rmtree(tmp_root, ignore_errors=True)
        tmp_root.mkdir(parents=True, exist_ok=True)
        manager = JobManager(store, holder.wait, limits, workers=settings.workers,
                             queue_limit=settings.queue_limit,
                             result_ttl_s=settings.result_ttl_s,
                             on_outcome=lambda o: metrics.jobs.labels(o).inc())
        store.acquire()  # one server per store: a second one refuses to start (18.10)
        requeued = store.recover()  # before accepting submissions (see JobStore.recover)
        if requeued:
            log.warning("re-queued %d job(s) interrupted by the previous shutdown",
                        len(requeued))
        store_box.update(store=store, manager=manager, tmp=tmp_root)
        metrics.queue_length.set_function(lambda: store.count(JobStatus.QUEUED))
        metrics.jobs_running.set_function(lambda: manager.running_count)
        holder.start(on_loaded=lambda: None if manager.start(recover=False) else None)
        try:
            yield
        finally:
            manager.stop()
            store.close()

    app = FastAPI(
        title="medinfer",
        version=__version__,
        description="Run trained 3D medical-imaging models on NIfTI / DICOM scans: "
                    "synchronous prediction, durable jobs with progress, model card.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine_holder = holder
    install_error_handlers(app)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes + _FORM_SLACK)
    # 401 from the headers alone, before any body is read (issue 18.5)
    app.add_middleware(AuthFirstMiddleware, api_keys=settings.api_keys,
                       admin_keys=settings.admin_api_keys)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    bearer = HTTPBearer(auto_error=False, description="API key (MEDINFER_API_KEYS)")

    def _principal(key: str | None) -> Principal | None:
        return principal_for(key, settings.api_keys, settings.admin_api_keys)

    def require_key(creds: HTTPAuthorizationCredentials | None = Depends(bearer)
                    ) -> Principal:
        who = _principal(creds.credentials if creds else None)
        if who is None:
            raise ApiError(401, "Unauthorized",
                           "missing or wrong API key; send 'Authorization: Bearer <key>'",
                           {"WWW-Authenticate": "Bearer"})
        return who

    auth = [Depends(require_key)]

    def _job_or_404(job_id: str, who: Principal | None = None) -> Job:
        job = _store().get(job_id) if _JOB_ID.match(job_id) else None
        if job is not None and who is not None and not who.may_read(job.owner):
            job = None  # another key's job: as if it did not exist
        if job is None:
            raise ApiError(404, "JobNotFound", f"job {job_id[:64]!r} does not exist")
        if not _store().outputs_complete(job):  # never 'succeeded' without its files
            _store().mark_lost(job.id)
            job = _store().get(job.id) or job
        return job

    # ------------------------------------------------------------------- health
    @app.get("/health/live", tags=["health"], summary="Liveness: the process answers")
    def live() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/health/ready", tags=["health"], responses=error_responses(503),
             summary="Readiness: model loaded and job store writable")
    @app.get("/health", tags=["health"], responses=error_responses(503),
             summary="Health (UNet3D / PIVOT name): same as /health/ready")
    def ready() -> JSONResponse:
        store = store_box.get("store")
        writable = bool(store is not None and store.writable())
        engine = holder.engine
        if engine is not None and writable:
            return JSONResponse({"status": "ready", "model": engine.name, "store": True})
        reason = ("model failed to load: " + holder.error if holder.error else
                  "model loading" if engine is None else "job store not writable")
        return error_response(503, "NotReady", reason)

    # ------------------------------------------------------------------- models
    @app.get("/v1/models", tags=["models"], dependencies=auth,
             responses=error_responses(401, 503), summary="The served model's card")
    def models() -> dict[str, Any]:
        engine = holder.require()
        return {"models": [engine.card_json]}

    # ------------------------------------------------------------------ predict
    @app.post(
        "/v1/predict", tags=["predict"], dependencies=auth,
        responses={**error_responses(400, 401, 413, 415, 422, 503),
                   200: {"content": {"application/json": {},
                                     "application/gzip": {}},
                         "description": "JSON summary, or the label map NIfTI "
                                        "(gzip) with return_binary=true"}},
        summary="Synchronous prediction on one scan",
    )
    async def predict(
        file: UploadFile = File(..., description="NIfTI (.nii), NIfTI gz, DICOM zip"),
        threshold: float | None = Query(None, gt=0.0, lt=1.0,
                                        description="probability threshold for sigmoid / "
                                                    "heat-map models"),
        return_binary: bool = Query(False, description="return label.nii.gz, not JSON"),
    ) -> Response:
        engine = holder.require()
        tmp = Path(tempfile.mkdtemp(prefix="predict-", dir=store_box["tmp"]))
        try:
            up = tmp / "upload"
            await run_in_threadpool(save_upload, file.file, up, limits, "file")
            config = JobConfig(threshold=threshold)

            def work() -> Any:
                t0 = time.perf_counter()
                scan = check_upload(up, tmp / "work", limits, name="file")
                volume = load_checked(scan, limits, name="file")
                t1 = time.perf_counter()
                prediction = engine.predict(volume, config)
                if return_binary:
                    from medinfer.io import save
                    from medinfer.serve.engine import result_volume

                    out = save(result_volume(prediction.label, volume, label_map=True),
                               tmp / "label.nii.gz")
                    return out.read_bytes()
                summary = prediction.summary()
                summary.setdefault("timings", {})
                summary["timings"]["http_load"] = t1 - t0
                return jsonable(summary)

            try:
                result = await anyio.to_thread.run_sync(work, limiter=predict_limiter)
            except MedinferError:
                metrics.predictions.labels("rejected").inc()
                raise
            metrics.predictions.labels("succeeded").inc()
        finally:
            await run_in_threadpool(shutil.rmtree, tmp, True)
        if return_binary:
            return Response(result, media_type="application/gzip",
                            headers={"Content-Disposition": 'attachment; filename="label.nii.gz"'})
        return JSONResponse(result)

    # --------------------------------------------------------------------- jobs
    async def _accept_upload(upload: UploadFile) -> Path:
        """Save + check an upload into a fresh tmp folder; returns the saved file."""
        tmp = Path(tempfile.mkdtemp(prefix="job-", dir=store_box["tmp"]))
        up = tmp / "upload"
        try:
            await run_in_threadpool(save_upload, upload.file, up, limits, "file")
            # under the workers' bound: parallel uploads do not multiply unpacking
            await anyio.to_thread.run_sync(check_upload, up, tmp / "check", limits, "file",
                                           limiter=predict_limiter)
        except BaseException:
            await run_in_threadpool(shutil.rmtree, tmp, True)
            raise
        return up

    def _check_queue_room() -> None:
        manager = _manager()
        if _store().count(JobStatus.QUEUED) >= settings.queue_limit:
            raise QueueFullError(settings.queue_limit, manager.retry_after())

    @app.post(
        "/api/v1/inference", tags=["jobs"], dependencies=auth, status_code=202,
        responses=error_responses(400, 401, 413, 415, 422, 429, 503),
        summary="Submit a scan as a durable job",
    )
    async def submit(
        file: UploadFile = File(..., description="NIfTI (.nii), NIfTI gz, DICOM zip"),
        config: UploadFile | None = File(None, description="optional job config YAML "
                                                            "(threshold, save_probabilities, "
                                                            "detection)"),
        who: Principal = Depends(require_key),
    ) -> JSONResponse:
        _check_queue_room()
        job_config = JobConfig()
        if config is not None:
            raw = await config.read(MAX_CONFIG_BYTES + 1)
            job_config = parse_job_config(raw, name="config")
        up = await _accept_upload(file)
        try:
            job = await run_in_threadpool(_manager().submit, up, job_config, "", who.owner)
        finally:
            await run_in_threadpool(shutil.rmtree, up.parent, True)
        return JSONResponse(status_code=202, content={
            **job.to_status(),
            "status_url": f"/api/v1/inference/{job.id}",
            "results_url": f"/api/v1/inference/{job.id}/results",
        })

    @app.get("/api/v1/inference/{job_id}", tags=["jobs"], dependencies=auth,
             responses=error_responses(401, 404), summary="Job status and progress")
    def job_status(job_id: str, who: Principal = Depends(require_key)) -> dict[str, Any]:
        job = _job_or_404(job_id, who)
        body = job.to_status()
        if job.status is JobStatus.SUCCEEDED:
            body["results_url"] = f"/api/v1/inference/{job.id}/results"
        return body

    @app.get("/api/v1/inference/{job_id}/results", tags=["jobs"], dependencies=auth,
             responses=error_responses(401, 404, 409, 410), summary="Job results")
    def job_results(job_id: str, who: Principal = Depends(require_key)) -> dict[str, Any]:
        job = _job_or_404(job_id, who)
        _require_succeeded(job)
        return results_body(job)

    @app.get("/api/v1/inference/{job_id}/files/{name}", tags=["jobs"], dependencies=auth,
             responses={**error_responses(401, 404, 409, 410),
                        200: {"content": {"application/gzip": {}, "application/json": {}},
                              "description": "the file"}},
             summary="Download one result file")
    def job_file(job_id: str, name: str, who: Principal = Depends(require_key)
                 ) -> FileResponse:
        job = _job_or_404(job_id, who)
        _require_succeeded(job)
        if name not in job.files:
            raise ApiError(404, "FileNotFound",
                           f"job {job.id} has no file {name[:100]!r}; files: {job.files}")
        path = _store().output_dir(job.id) / job.files[job.files.index(name)]
        if not path.is_file():
            raise ApiError(410, "JobExpired", f"the files of job {job.id} were removed")
        media = _MEDIA.get(path.suffix, "application/octet-stream")
        return FileResponse(path, media_type=media, filename=path.name)

    @app.delete("/api/v1/inference/{job_id}", tags=["jobs"], dependencies=auth,
                responses=error_responses(401, 404, 409), summary="Cancel a job")
    def job_cancel(job_id: str, who: Principal = Depends(require_key)) -> JSONResponse:
        job = _job_or_404(job_id, who)
        status = _manager().cancel(job.id)
        if status is JobStatus.CANCELLED and job.status is JobStatus.QUEUED:
            return JSONResponse({"job_id": job.id, "status": "cancelled"})
        if status is JobStatus.RUNNING:
            return JSONResponse(status_code=202,
                                content={"job_id": job.id, "status": "cancelling"})
        raise ApiError(409, "JobFinished",
                       f"job {job.id} already ended with status {job.status.value!r}")

    def _require_succeeded(job: Job) -> None:
        if job.status is JobStatus.SUCCEEDED:
            return
        if job.status is JobStatus.EXPIRED:
            raise ApiError(410, "JobExpired", f"the results of job {job.id} have expired "
                           f"(MEDINFER_RESULT_TTL_S = {settings.result_ttl_s:g} s)")
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            raise ApiError(409, "JobNotFinished",
                           f"job {job.id} is {job.status.value} ({job.progress:.0f} %)")
        raise ApiError(409, "JobNotSucceeded",
                       f"job {job.id} ended with status {job.status.value!r}: "
                       f"{job.error_type}: {job.error_message}")

    # ---------------------------------------------------------------- websocket
    @app.websocket("/api/v1/inference/stream")
    async def stream(ws: WebSocket) -> None:
        """Submit a scan or follow a job; JSON events until the job ends.

        Protocol: the client's first message is either ``{"job_id": "..."}`` (subscribe),
        ``{"action": "submit", "size": N, "config": {...}}`` followed by binary messages
        totalling N bytes (the scan), or one binary message (the scan). The server sends
        ``{"event", "job_id", "status", "stage", "progress"}`` objects (progress 0-100,
        never decreasing); the last has ``event`` ``completed`` (with ``result``),
        ``failed`` or ``cancelled`` (with ``error``), or ``error`` for a refused request.
        Then the server closes the socket.
        """
        key = ws.query_params.get("api_key")
        header = ws.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            key = header[7:].strip()
        await ws.accept()
        try:
            who = _principal(key)
            if who is None:  # refused before any message is read
                await _ws_error(ws, 401, "Unauthorized", "missing or wrong API key")
                return
            job_id = await _ws_open(ws, who)
            if job_id is None:
                return
            await _ws_follow(ws, job_id)
        except WebSocketDisconnect:
            return
        except TimeoutError:
            await _ws_error(ws, 408, "Timeout", "no message from the client in time",
                            code=1008)
        except Exception:  # never drop the socket without a close frame
            log.exception("WebSocket request failed")
            await _ws_error(ws, 400, "BadRequest", "the request could not be processed",
                            code=1011)

    async def _ws_error(ws: WebSocket, status: int, type_: str, message: str,
                        code: int = 1008) -> None:
        if ws.application_state == WebSocketState.CONNECTED:
            body = error_body(status, type_, message)
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                await ws.send_json({"event": "error", "status": "failed", "progress": 0.0,
                                    **body})
                await ws.close(code=code)

    async def _ws_open(ws: WebSocket, who: Principal) -> str | None:
        tmp = Path(tempfile.mkdtemp(prefix="ws-", dir=store_box["tmp"]))
        try:
            return await _ws_open_in(ws, tmp, who)
        finally:
            await run_in_threadpool(shutil.rmtree, tmp, True)

    async def _ws_open_in(ws: WebSocket, tmp: Path, who: Principal) -> str | None:
        """Read the client's request; submit a scan or return the job id to follow."""
        up = tmp / "upload"
        first = await asyncio.wait_for(ws.receive(), _WS_IDLE_S)
        if first.get("type") == "websocket.disconnect":
            raise WebSocketDisconnect(first.get("code", 1000))
        if first.get("bytes") is not None:
            data: bytes = first["bytes"]
            if len(data) > settings.max_upload_bytes:
                await _ws_error(ws, 413, "PayloadTooLarge", "scan larger than the upload limit")
                return None
            await run_in_threadpool(up.write_bytes, data)
            del data
            config = JobConfig()
        else:
            try:
                msg = json.loads(first.get("text") or "")
            except (json.JSONDecodeError, RecursionError):
                await _ws_error(ws, 400, "BadRequest", "first message must be JSON or bytes")
                return None
            if not isinstance(msg, dict):
                await _ws_error(ws, 400, "BadRequest", "first message must be a JSON object")
                return None
            if "job_id" in msg:
                job_id = str(msg["job_id"])
                found = _store().get(job_id) if _JOB_ID.match(job_id) else None
                if found is None or not who.may_read(found.owner):
                    await _ws_error(ws, 404, "JobNotFound", f"job {job_id[:64]!r} does not "
                                    "exist")
                    return None
                return job_id
            if msg.get("action") != "submit":
                await _ws_error(ws, 400, "BadRequest",
                                "expected {'job_id': ...} or {'action': 'submit', 'size': N}")
                return None
            size = msg.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                await _ws_error(ws, 400, "BadRequest", "'size' must be a positive integer")
                return None
            if size > settings.max_upload_bytes:
                await _ws_error(ws, 413, "PayloadTooLarge",
                                f"{size} bytes; the limit is {settings.max_upload_bytes}")
                return None
            try:
                config = parse_job_config(msg.get("config") or {}, name="config")
            except MedinferError as exc:
                await _ws_error(ws, status_for(exc), type(exc).__name__, str(exc))
                return None
            got = 0
            with open(up, "wb") as fh:
                for _ in range(size):  # bounded: each message carries >= 1 byte
                    if got >= size:
                        break
                    m = await asyncio.wait_for(ws.receive(), _WS_IDLE_S)
                    if m.get("type") == "websocket.disconnect":
                        raise WebSocketDisconnect(m.get("code", 1000))
                    chunk = m.get("bytes")
                    if not chunk:
                        await _ws_error(ws, 400, "BadRequest", "expected binary scan data")
                        return None
                    got += len(chunk)
                    if got > size:
                        await _ws_error(ws, 400, "BadRequest", "more bytes than announced")
                        return None
                    await run_in_threadpool(fh.write, chunk)
        try:
            _check_queue_room()
            await anyio.to_thread.run_sync(check_upload, up, tmp / "check", limits, "scan",
                                           limiter=predict_limiter)
            job = await run_in_threadpool(_manager().submit, up, config, "", who.owner)
        except QueueFullError as exc:
            await _ws_error(ws, 429, "QueueFull", f"{exc} (retry after {exc.retry_after} s)")
            return None
        except MedinferError as exc:
            await _ws_error(ws, status_for(exc), type(exc).__name__, str(exc))
            return None
        return job.id

    async def _ws_follow(ws: WebSocket, job_id: str) -> None:
        manager = _manager()
        sub = manager.subscribe(job_id, asyncio.get_running_loop())
        last = -1.0
        try:
            deadline = time.monotonic() + _WS_MAX_S
            job = _store().get(job_id)
            event: dict[str, Any] | None = _snapshot(job) if job is not None else None
            while time.monotonic() < deadline:
                if event is not None:
                    event["progress"] = max(last, float(event.get("progress", 0.0)))
                    last = event["progress"]
                    if event["event"] in ("completed", "failed", "cancelled", "expired"):
                        await ws.send_json(_described_final(event))
                        await ws.close(code=1000)
                        return
                    await ws.send_json(event)
                try:
                    event = await asyncio.wait_for(sub.queue.get(), 5.0)
                except TimeoutError:
                    job = _store().get(job_id)  # resync (e.g. a missed terminal event)
                    event = _snapshot(job) if job is not None and job.status.terminal \
                        else None
            await _ws_error(ws, 408, "Timeout", "stream time limit reached", code=1000)
        finally:
            manager.unsubscribe(job_id, sub)

    def _described_final(event: dict[str, Any]) -> dict[str, Any]:
        """The PIVOT stream contract on the last event: ``status`` ``completed`` with
        top-level ``detections`` (the job status stays in ``job_status``), or ``failed``."""
        ev = dict(event, job_status=event.get("status"))
        if ev["event"] == "completed":
            ev["status"] = "completed"
            summary = (ev.get("result") or {}).get("summary") or {}
            ev["detections"] = summary.get("detections") or []
        else:
            ev["status"] = "failed" if ev["event"] == "failed" else str(ev["event"])
            ev.setdefault("error", {"type": ev["event"], "message": f"job {ev['event']}"})
        return ev

    def _snapshot(job: Job) -> dict[str, Any]:
        kind = {JobStatus.SUCCEEDED: "completed", JobStatus.FAILED: "failed",
                JobStatus.CANCELLED: "cancelled", JobStatus.EXPIRED: "expired"}.get(
                    job.status, "status")
        ev: dict[str, Any] = {"event": kind, "job_id": job.id, "status": job.status.value,
                              "stage": job.stage, "progress": round(job.progress, 2)}
        if job.status is JobStatus.SUCCEEDED:
            ev["result"] = results_body(job)
        elif job.error_type:
            ev["error"] = {"type": job.error_type, "message": job.error_message or ""}
        return ev

    # ------------------------------------------------------------------ metrics
    @app.get("/metrics", tags=["health"], dependencies=auth,
             responses={**error_responses(401),
                        200: {"content": {"text/plain": {}}, "description": "metrics"}},
             summary="Prometheus metrics")
    def prom() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
