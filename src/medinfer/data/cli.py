"""``medinfer data metadata|cache|stats``: build the metadata and the uint8 cache of a data folder.

Exit codes follow :mod:`medinfer.cli`: 2 for bad input (missing folder, bad mode
mapping, missing metadata), 1 when some images failed unexpectedly during ``cache``.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

data_app = typer.Typer(
    name="data",
    help="Training data pipeline: dataset metadata, uint8 cache, cache statistics.",
    no_args_is_help=True,
)


def _parse_modes(modes: list[str]) -> dict[str, str] | str | None:
    from medinfer.errors import ConfigError

    if not modes:
        return None
    if len(modes) == 1 and "=" not in modes[0]:
        return modes[0]
    mapping: dict[str, str] = {}
    for item in modes:
        pattern, sep, mode = item.rpartition("=")
        if not sep or not pattern:
            raise ConfigError(
                f"--mode: {item!r} is not PATTERN=MODE (e.g. '*/ct*=ct') or a single mode"
            )
        mapping[pattern] = mode
    return mapping


@data_app.command("metadata")
def metadata_cmd(
    data_dir: Path = typer.Argument(..., help="Data folder holding raw/<study>/<image>."),
    mode: list[str] = typer.Option(
        [],
        "--mode",
        "-m",
        help="'ct' or 'mri' for all images, or PATTERN=MODE (repeatable; fnmatch on "
        "'<study>/<image>', first match wins). Unmatched DICOM images use their Modality.",
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Default: DATA_DIR/metadata.json."
    ),
) -> None:
    """Scan DATA_DIR/raw and write the dataset metadata (JSON)."""
    from medinfer.data.metadata import DatasetMetadata, UnmatchedModeError
    from medinfer.errors import ConfigError

    try:
        meta = DatasetMetadata.from_directory(data_dir, _parse_modes(mode))
    except UnmatchedModeError as exc:  # say it in the command line's syntax
        raise ConfigError(exc.cli_message()) from None
    path = meta.save(output if output is not None else data_dir / "metadata.json")
    counts: dict[str, int] = {}
    for e in meta.images:
        counts[e.mode] = counts.get(e.mode, 0) + 1
    typer.echo(
        f"{len(meta.images)} images in {len(meta.studies)} studies "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))}) -> {path}"
    )


@data_app.command("cache")
def cache_cmd(
    data_dir: Path = typer.Argument(..., help="Data folder with metadata.json."),
    workers: int = typer.Option(None, "--workers", "-j", help="Worker processes (default: CPUs)."),
    force: bool = typer.Option(False, "--force", help="Rebuild every entry."),
) -> None:
    """Build (or complete) the uint8 cache under DATA_DIR/processed."""
    from medinfer.data.cache import CacheManager

    report = CacheManager(data_dir).build_cache(num_workers=workers, force=force, on_error="skip")
    typer.echo(
        f"built {report.built}, up to date {report.up_to_date}, unusable {report.unusable}, "
        f"failed {len(report.failed)}"
    )
    for name, err in report.failed.items():
        typer.echo(f"failed: {name}: {err}", err=True)
    if report.failed:
        raise typer.Exit(1)


@data_app.command("stats")
def stats_cmd(
    data_dir: Path = typer.Argument(..., help="Data folder with metadata.json."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
) -> None:
    """Print cache statistics (cached / unusable / missing / stale, sizes, tokens)."""
    from medinfer.data.cache import CacheManager

    stats = CacheManager(data_dir).get_cache_stats()
    if as_json:
        typer.echo(json.dumps(stats, indent=1))
        return
    ratio = stats["size_ratio"]
    typer.echo(
        f"images {stats['images']}: cached {stats['cached']}, unusable {stats['unusable']}, "
        f"missing {stats['missing']}, stale {stats['stale']}"
    )
    typer.echo(
        f"cache {stats['bytes'] / 2**20:.1f} MiB "
        f"(float32 would be {stats['float32_bytes'] / 2**20:.1f} MiB; ratio "
        f"{'n/a' if ratio is None else f'{ratio:.3f}'}), tokens {stats['tokens']} "
        f"({stats['foreground_tokens']} foreground)"
    )
    typer.echo(f"by mode {stats['by_mode']}, by view {stats['by_view']}")
    for name, reason in stats["unusable_reasons"].items():
        typer.echo(f"unusable: {name}: {reason}")


def register(app: typer.Typer) -> None:
    """Add the ``data`` command group to the root app."""
    app.add_typer(data_app, name="data")
