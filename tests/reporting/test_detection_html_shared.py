"""3-D HTML pages in batch folders share one CDN-free plotly.js (issue 17 item 14).

The page of a single scan inlines plotly.js (opens anywhere offline); pages written with
``plotlyjs="shared"`` load ``plotly.min.js`` from their folder, written once there from
the installed plotly. (The batch run of ``test_detection_outputs`` opens such a page in
headless Chromium.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from plotly.offline import get_plotlyjs

from medinfer.errors import MedinferError
from medinfer.reporting.detection_html import SHARED_PLOTLYJS, write_detection_html
from medinfer.volume import Volume

AFF = np.array([[-1.5, 0.0, 0.0, 40.0], [0.0, -1.5, 0.2, 20.0], [0.0, 0.0, 2.0, -30.0],
                [0.0, 0.0, 0.0, 1.0]])


def test_shared_plotly_copy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = Volume(rng.uniform(0, 100, (1, 12, 10, 8)).astype(np.float32), AFF)
    heat = Volume(rng.random((1, 12, 10, 8)).astype(np.float32), AFF)
    inline = write_detection_html(tmp_path / "single" / "a_3d.html", image, heat, [])
    pages = [write_detection_html(tmp_path / "batch" / f"{c}_3d.html", image, heat, [],
                                  plotlyjs="shared") for c in ("a", "b")]
    shared = tmp_path / "batch" / SHARED_PLOTLYJS
    assert shared.read_text(encoding="utf-8") == get_plotlyjs()
    assert not (tmp_path / "single" / SHARED_PLOTLYJS).exists()
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert f'src="{SHARED_PLOTLYJS}"' in text and "http" not in text
        assert 10 * page.stat().st_size < inline.stat().st_size
    with pytest.raises(MedinferError, match="plotlyjs"):
        write_detection_html(tmp_path / "x.html", image, heat, [], plotlyjs="cdn")
