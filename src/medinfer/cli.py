"""The ``medinfer`` command line: one command with sub-commands.

Each front-door sub-package contributes its sub-commands through a module with a
``register(app: typer.Typer) -> None`` function, listed in ``_PLUGINS``. Heavy
imports (torch, MONAI, FastAPI) happen inside the commands, not at start-up.

Exit codes: 0 success, 1 unexpected internal error, 2 bad input (any
:class:`medinfer.errors.MedinferError`, usage errors, missing input files); the
message goes to stderr without a traceback.
"""

from __future__ import annotations

import errno
import importlib
import logging
import re
import sys
from collections.abc import Sequence

import typer

from medinfer.errors import MedinferError

app = typer.Typer(
    name="medinfer",
    help="Run trained 3D medical-imaging models on real scans (NIfTI, DICOM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain help and error text: Rich markup would swallow "[default: card]" and
    # "pip install 'medinfer[ui]'"
    rich_markup_mode=None,
)

#: modules that contribute sub-commands via ``register(app)``
_PLUGINS: list[str] = [
    "medinfer.inference.cli",
    "medinfer.data.cli",
    "medinfer.slices.cli",
    "medinfer.serve.cli",
    "medinfer.postprocess.cli",
    "medinfer.compat.pivot.main",
    "medinfer.formats.nnunet_cli",
    "medinfer.pacs.cli",
    "medinfer.federated.cli",
    "medinfer.training.cli",
]


def _print_version(value: bool) -> None:
    if value:
        from medinfer import __version__

        typer.echo(f"medinfer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress and timings."),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True,
        help="Print the medinfer version and exit."),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command("version")
def version() -> None:
    """Print the medinfer version."""
    from medinfer import __version__

    typer.echo(__version__)


def _register_plugins() -> None:
    for name in _PLUGINS:
        importlib.import_module(name).register(app)
    # sub-command groups print their help as plain text too (see rich_markup_mode above)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            group.typer_instance.rich_markup_mode = None


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"medinfer: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


#: options that take several space-separated values (``--folds 0 1 2``), as nnU-Net's CLI does
_MULTI_VALUE_OPTIONS = {"--folds": re.compile(r"^(\d+|all)$")}


def join_multi_value_options(argv: Sequence[str]) -> list[str]:
    """Rewrite ``--folds 0 1 2`` as ``--folds 0,1,2`` (typer options take one value each).

    Only tokens that look like values of that option (fold numbers or ``all``) are
    joined, so inputs after the option list are kept as inputs.
    """
    out: list[str] = []
    i = 0
    args = list(argv)
    while i < len(args):
        token = args[i]
        pattern = _MULTI_VALUE_OPTIONS.get(token)
        if pattern is None:
            out.append(token)
            i += 1
            continue
        values: list[str] = []
        i += 1
        while i < len(args) and pattern.match(args[i]):
            values.append(args[i])
            i += 1
        out.append(token)
        if values:
            out.append(",".join(values))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point; maps input errors to exit code 2 with a one-line message.

    Usage errors (unknown command, bad option) are reported by typer with exit code 2.
    """
    _register_plugins()
    try:
        from medinfer.distributed import fill_bare_ray_option

        args = fill_bare_ray_option(
            join_multi_value_options(sys.argv[1:] if argv is None else argv))
        app(args=args, prog_name="medinfer")
    except MedinferError as exc:
        _fail(str(exc), 2)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        _fail(f"{exc.strerror or exc}: {exc.filename}", 2)
    except OSError as exc:
        # a full disk, a name too long for the file system, a read-only output folder:
        # one clean message, exit 2 (issue 18.9); other OS errors keep their traceback
        if exc.errno not in _CLEAN_ERRNOS:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        _fail(f"{exc.strerror or exc}{where}", 2)


_CLEAN_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.EROFS,
                           errno.EEXIST, errno.ENOTEMPTY, errno.EFBIG, errno.ELOOP})


if __name__ == "__main__":  # pragma: no cover
    main()
