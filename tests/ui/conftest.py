"""The UI tests reuse the serving test helpers (tests/serve/_serve_support.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
