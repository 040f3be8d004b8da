"""CLI sub-commands ``medinfer serve`` (HTTP API) and ``medinfer ui`` (Streamlit web UI)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add ``serve`` and ``ui`` to the root app."""
    app.command("serve")(serve)
    app.command("ui")(ui)


def serve(
    model: str | None = typer.Option(None, "--model", "-m",
                                     help="Bundled model name or model folder / model.yaml "
                                          "(default: MEDINFER_MODEL or demo-brain)."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 for all)."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    device: str | None = typer.Option(None, help="auto | cuda | cpu (MEDINFER_DEVICE)."),
    workers: int | None = typer.Option(None, min=1, max=64,
                                       help="Job worker threads (MEDINFER_WORKERS)."),
    job_store: Path | None = typer.Option(None, help="Job store folder (MEDINFER_JOB_STORE)."),
    queue_limit: int | None = typer.Option(None, min=1,
                                           help="Queued jobs before 429 "
                                                "(MEDINFER_QUEUE_LIMIT)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Run the HTTP API (FastAPI + uvicorn); all settings also come from MEDINFER_*."""
    import uvicorn

    from medinfer.serve.application import create_app
    from medinfer.serve.settings import load_settings

    settings = load_settings(model=model, device=device, workers=workers, job_store=job_store,
                             queue_limit=queue_limit)
    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, log_level=log_level,
                # a scan up to the upload limit fits in one WebSocket message
                ws_max_size=max(16 * 1024 * 1024, settings.max_upload_bytes + 65536),
                timeout_graceful_shutdown=10)


def ui(
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8501, min=1, max=65535, help="TCP port."),
    api_url: str | None = typer.Option(None, help="Default API URL shown in the UI "
                                                 "(MEDINFER_UI_API_URL)."),
    model: str | None = typer.Option(None, "--model", "-m",
                                     help="Model for local runs (MEDINFER_MODEL)."),
) -> None:
    """Run the Streamlit review UI (needs the ``ui`` extra: pip install 'medinfer[ui]')."""
    try:
        import streamlit  # noqa: F401
    except ImportError:
        raise typer.BadParameter("the web UI needs Streamlit: pip install 'medinfer[ui]'") \
            from None
    script = Path(__file__).resolve().parent.parent / "ui" / "app.py"
    env = dict(os.environ)
    if api_url:
        env["MEDINFER_UI_API_URL"] = api_url
    if model:
        env["MEDINFER_MODEL"] = model
    cmd = [sys.executable, "-m", "streamlit", "run", str(script),
           "--server.address", host, "--server.port", str(port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false"]
    # replace this process by Streamlit: signals (Ctrl-C, SIGTERM) reach it directly and no
    # orphaned server is left behind
    os.execve(sys.executable, cmd, env)
