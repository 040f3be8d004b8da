"""Packaging (issue 17 item 1): ``make demo`` installs only what the main job needs,
``make test`` brings its own tools or stops before the tests with one message.

Timing-free, no network: the dependency lists are read from ``pyproject.toml``, the CLI
start-up is checked in a subprocess (which modules it imports), and
``scripts/ensure_test_tools.sh --check-only`` runs with an empty PATH.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: packages of the extras; none may be imported when the ``medinfer`` command starts
EXTRA_MODULES = ("fastapi", "uvicorn", "httpx", "streamlit", "ray", "plotly", "reportlab",
                 "onnxruntime", "playwright", "SimpleITK", "dynamic_network_architectures",
                 "dicomweb_client", "pynetdicom", "pytest", "flwr")


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_core_dependencies_are_only_what_the_main_job_needs() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = _names(project["dependencies"])
    extras = {k: _names(v) for k, v in project["optional-dependencies"].items()}
    assert {"torch", "numpy", "nibabel", "pydicom", "highdicom", "scipy"} <= core
    for tool in ("pytest", "mypy", "ruff", "playwright", "streamlit", "pyarrow", "fastapi",
                 "simpleitk", "dcm2niix", "dcmqi", "ray", "plotly"):
        assert tool not in core, tool
    assert {"dcm2niix", "dcmqi", "simpleitk", "hypothesis", "pytest"} <= extras["dev"]
    makefile = (REPO / "Makefile").read_text()
    demo_install = makefile.split("$(STAMP_DEMO): pyproject.toml")[1].split("\n\n")[0]
    assert "pip install -q torch==2.13.0" in demo_install
    assert 'pip install -q -e .\n' in demo_install  # core only: no extras for the demo
    assert demo_install.index("torch==2.13.0") < demo_install.index("-e .")
    test_rule = makefile.split("\ntest:")[1].split("\n\n")[0]
    assert test_rule.index("ensure_test_tools.sh") < test_rule.index("pytest")


def test_cli_start_up_imports_no_extra() -> None:
    code = ("import json, sys\nfrom medinfer.cli import _register_plugins\n"
            "_register_plugins()\n"
            f"print(json.dumps([m for m in {EXTRA_MODULES!r} + ('torch',) "
            "if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_missing_debian_tools_stop_with_one_message(tmp_path: Path) -> None:
    script = REPO / "scripts" / "ensure_test_tools.sh"
    env = {"PATH": str(tmp_path), "CHROMIUM_BIN": str(tmp_path / "none"),
           "ORTHANC_BIN": str(tmp_path / "none"), "ORTHANC_PLUGINS_DIR": str(tmp_path)}
    proc = subprocess.run(["/bin/bash", str(script), "--check-only"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and proc.stdout == ""
    for pkg in ("chromium", "dicom3tools", "orthanc", "orthanc-dicomweb"):
        assert pkg in lines[0]
    # on this machine (as after `make test` installed them) nothing is missing
    ok = subprocess.run(["/bin/bash", str(script), "--check-only"], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and ok.stderr == ""
