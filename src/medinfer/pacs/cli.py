"""``medinfer pacs run | pull | push | listen``: the PACS node on the command line."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import typer

pacs_app = typer.Typer(help="Pull studies from a PACS, run a model, push DICOM results back.",
                       no_args_is_help=True)

_URL = typer.Option(..., "--url", help="DICOMweb root, e.g. http://host:8042/dicom-web.")
_USER = typer.Option(None, "--user", help="HTTP basic user [env MEDINFER_PACS_USER].")
_PASSWORD = typer.Option(None, "--password",
                         help="HTTP basic password [env MEDINFER_PACS_PASSWORD].")
_TOKEN = typer.Option(None, "--token", help="Bearer token [env MEDINFER_PACS_TOKEN].")


def _connect(url: str, user: str | None, password: str | None, token: str | None) -> Any:
    from medinfer.pacs.dicomweb import PacsAuth, connect

    return connect(url, PacsAuth.from_env(user, password, token))


def _import_pacs() -> None:
    from medinfer.errors import ConfigError

    try:
        import dicomweb_client  # noqa: F401
        import pynetdicom  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"medinfer pacs needs the 'pacs' extra (pip install "
                          f"'medinfer[pacs]'): {exc}") from None


@pacs_app.command("run")
def run_cmd(
    url: str = _URL,
    study: str | None = typer.Option(None, "--study", help="StudyInstanceUID to process."),
    series: str | None = typer.Option(None, "--series", help="Only this SeriesInstanceUID."),
    model: str = typer.Option(..., "--model", "-m", help="Model name or folder."),
    output_format: str | None = typer.Option(
        None, "--output-format",
        help="dicom-seg, rtstruct, dicom-sr or all [default: dicom-seg for segmentation, "
             "dicom-sr for detection models]."),
    seg_type: str = typer.Option("binary", "--seg-type", help="binary or labelmap."),
    seg_compression: str = typer.Option("none", "--seg-compression",
                                        help="none, rle, jpeg2000 or jpegls."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    user: str | None = _USER, password: str | None = _PASSWORD, token: str | None = _TOKEN,
    watch: bool = typer.Option(False, "--watch", help="Poll QIDO-RS for new series."),
    modality: str | None = typer.Option(None, "--modality", help="--watch: Modality filter."),
    description: str | None = typer.Option(
        None, "--series-description", help="--watch: SeriesDescription regular expression."),
    state: Path = typer.Option(Path("medinfer-pacs-state.sqlite"), "--state",
                               help="--watch: SQLite state file (restart-safe)."),
    interval: float = typer.Option(10.0, "--interval", help="--watch: seconds between polls."),
    max_polls: int | None = typer.Option(None, "--max-polls",
                                         help="--watch: stop after N polls."),
) -> None:
    """QIDO search -> WADO-RS retrieve -> predict -> STOW-RS into the same study."""
    import re

    from medinfer.errors import ConfigError
    from medinfer.pacs.dicomweb import run_study
    from medinfer.pacs.dicomweb import watch as watch_fn
    from medinfer.pacs.node import default_options

    _import_pacs()
    options = default_options(model, output_format, seg_type, seg_compression)
    pacs = _connect(url, user, password, token)
    if watch:
        if description:
            try:
                re.compile(description)
            except re.error as exc:
                raise ConfigError(f"--series-description: {description!r} is not a valid "
                                  f"regular expression ({exc})") from None
        watch_fn(pacs, model, options, state, study=study, modality=modality,
                 description=description, interval_s=interval, max_polls=max_polls,
                 device=device)
        return
    if not study:
        raise ConfigError("--study: required (or use --watch)")
    res = run_study(pacs, study, model, options, series=series, device=device)
    typer.echo(json.dumps(res))


@pacs_app.command("pull")
def pull_cmd(
    url: str = _URL,
    study: str = typer.Option(..., "--study", help="StudyInstanceUID."),
    series: str | None = typer.Option(None, "--series", help="Only this SeriesInstanceUID."),
    output_dir: Path = typer.Option(..., "--output", "-o", help="Folder for the series."),
    user: str | None = _USER, password: str | None = _PASSWORD, token: str | None = _TOKEN,
) -> None:
    """WADO-RS retrieve a study's image series (one folder per series)."""
    from medinfer.pacs.dicomweb import pull

    _import_pacs()
    folders = pull(_connect(url, user, password, token), study, output_dir, series)
    typer.echo(json.dumps({uid: str(p) for uid, p in folders.items()}))


@pacs_app.command("push")
def push_cmd(
    files: list[Path] = typer.Argument(..., help="DICOM files or folders to store."),
    url: str = _URL,
    study: str | None = typer.Option(None, "--study", help="Store into this study."),
    user: str | None = _USER, password: str | None = _PASSWORD, token: str | None = _TOKEN,
) -> None:
    """STOW-RS DICOM files to the PACS."""
    from medinfer.pacs.dicomweb import push

    _import_pacs()
    paths = [f for p in files for f in (sorted(x for x in p.rglob("*") if x.is_file())
                                        if p.is_dir() else [p])]
    n = push(_connect(url, user, password, token), paths, study)
    typer.echo(json.dumps({"stored": n}))


@pacs_app.command("listen")
def listen_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Model name or folder."),
    ae_title: str = typer.Option("MEDINFER", "--ae-title", help="This node's AE title."),
    port: int = typer.Option(11112, "--port", help="DICOM port."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    forward: str | None = typer.Option(None, "--forward",
                                       help="HOST:PORT:AET that receives the results."),
    allow_aet: list[str] | None = typer.Option(
        None, "--allow-aet", help="Calling AE title accepted (repeat; default: any)."),
    allow_host: list[str] | None = typer.Option(
        None, "--allow-host", help="Peer IP address accepted (repeat; default: any)."),
    storage: Path = typer.Option(Path("medinfer-pacs"), "--storage",
                                 help="Folder for received instances, results and state."),
    idle_timeout: float = typer.Option(
        10.0, "--idle-timeout", help="A series is complete after this many idle seconds."),
    output_format: str | None = typer.Option(None, "--output-format",
                                             help="As for pacs run."),
    seg_type: str = typer.Option("binary", "--seg-type", help="binary or labelmap."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """C-STORE SCP: run the model on each completed series and C-STORE the results on."""
    from medinfer.pacs.dimse import DicomListener, parse_destination
    from medinfer.pacs.node import default_options

    _import_pacs()
    options = default_options(model, output_format, seg_type)
    listener = DicomListener(storage, model, options,
                             forward=parse_destination(forward) if forward else None,
                             ae_title=ae_title, host=host, port=port,
                             allowed_aets=allow_aet or [], allowed_hosts=allow_host or [],
                             idle_timeout_s=idle_timeout, device=device)

    def _stop(signum: int, _frame: Any) -> None:
        logging.getLogger(__name__).warning("signal %d: stopping", signum)
        listener._stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    listener.serve_forever()
    sys.stderr.flush()


def register(app: typer.Typer) -> None:
    """Add ``pacs`` to the root app."""
    app.add_typer(pacs_app, name="pacs")
