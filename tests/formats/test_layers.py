"""Layering of model formats: one way, ``formats`` -> ``inference`` / ``models``.

The engine (:mod:`medinfer.inference`) and the loaders (:mod:`medinfer.models`) never
import :mod:`medinfer.formats`, the loaders never import the engine, and ``formats``
uses only public names of the engine. Sub-command modules (``cli.py``) are front doors
and may use every layer. Checked on the source (every ``import``
statement, also those inside functions), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import medinfer

PKG = Path(medinfer.__file__).resolve().parent


def _imports(sub: str) -> list[tuple[str, str, str]]:
    """(file, module, imported name or '') for every medinfer import under ``sub``."""
    out = []
    for f in sorted((PKG / sub).rglob("*.py")):
        if f.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    out.append((f.name, node.module, alias.name))
            elif isinstance(node, ast.Import):
                out.extend((f.name, alias.name, "") for alias in node.names)
    return [t for t in out if t[1].startswith("medinfer")]


def test_engine_and_loaders_do_not_import_formats() -> None:
    for sub in ("inference", "models", "transforms", "io"):
        bad = [t for t in _imports(sub) if t[1].startswith("medinfer.formats")]
        assert bad == [], f"{sub} imports the formats layer: {bad}"


def test_loaders_do_not_import_the_engine() -> None:
    bad = [t for t in _imports("models") if t[1].startswith("medinfer.inference")]
    assert bad == [], f"models imports inference: {bad}"


def test_formats_use_only_the_engines_public_api() -> None:
    found = _imports("formats")
    assert any(t[1] == "medinfer.inference" for t in found)
    bad = [t for t in found if t[1].startswith("medinfer.inference")
           and (t[2].startswith("_") or t[1].count(".") > 1
                and t[1] not in ("medinfer.inference.batch", "medinfer.inference.predictor"))]
    assert bad == [], f"formats uses private engine names: {bad}"
