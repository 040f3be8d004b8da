"""Interactive 3-D view of detection results: a self-contained HTML file (plotly).

The page holds plotly.js inline (``include_plotlyjs=True``), so it opens offline; in batch
output folders (``plotlyjs="shared"``) the pages instead load one shared copy,
``plotly.min.js`` beside them (written once, from the installed plotly: no CDN, still
offline), which saves the ~4.6 MB of plotly.js per page. Scene in
world RAS+ mm (x = R, y = A, z = S) with equal aspect:

* a point cloud of the scan (voxels inside the display window, subsampled to at most
  ``max_points``), grey, faint;
* the heat-map region (voxels ``>= threshold``), coloured by heat value;
* one sphere (mesh) per finding with the finding's equivalent diameter, hover text with id,
  RAS / LPS coordinates, diameter, volume, confidence and risk category.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medinfer._atomic import write_text_atomic
from medinfer.errors import MedinferError
from medinfer.volume import Volume


def _plotly() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError:  # pragma: no cover - depends on the install
        raise MedinferError("the 3-D HTML view needs plotly: pip install 'medinfer[report]'") \
            from None
    return go


def _sample(mask: np.ndarray, max_points: int, rng: np.random.Generator) -> np.ndarray:
    idx = np.argwhere(mask)
    if len(idx) > max_points:
        idx = idx[rng.choice(len(idx), size=max_points, replace=False)]
    return idx


def _sphere(center: Sequence[float], radius: float, n: int = 14) -> tuple[np.ndarray, ...]:
    u = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False)
    v = np.linspace(0, np.pi, n + 1)
    uu, vv = np.meshgrid(u, v)
    x = center[0] + radius * np.cos(uu) * np.sin(vv)
    y = center[1] + radius * np.sin(uu) * np.sin(vv)
    z = center[2] + radius * np.cos(vv)
    rows, cols = uu.shape
    tri_i, tri_j, tri_k = [], [], []
    for r in range(rows - 1):
        for c in range(cols):
            a = r * cols + c
            b = r * cols + (c + 1) % cols
            d = (r + 1) * cols + c
            e = (r + 1) * cols + (c + 1) % cols
            tri_i += [a, b]
            tri_j += [b, e]
            tri_k += [d, d]
    return x.ravel(), y.ravel(), z.ravel(), np.array(tri_i), np.array(tri_j), np.array(tri_k)


def write_detection_html(
    path: str | os.PathLike[str],
    image: Volume,
    heatmap: Volume,
    detections: Sequence[dict[str, Any]],
    *,
    title: str = "",
    threshold: float = 0.5,
    window_hu: tuple[float, float] = (-20.0, 180.0),
    colormap: str = "Hot",
    max_points: int = 60000,
    seed: int = 0,
    plotlyjs: str = "inline",
) -> Path:
    """Write ``<case>_3d.html`` (see module doc); returns the path.

    ``plotlyjs``: ``"inline"`` (self-contained page) or ``"shared"`` (the page loads
    ``plotly.min.js`` from its own folder; the file is written there if missing).

    Raises
    ------
    MedinferError
        plotly is not installed, or ``plotlyjs`` is neither ``inline`` nor ``shared``.
    """
    if plotlyjs not in ("inline", "shared"):
        raise MedinferError(f"plotlyjs: {plotlyjs!r} is not allowed; choose 'inline' or "
                            "'shared'")
    go = _plotly()
    rng = np.random.default_rng(seed)
    img = np.asarray(image.array[0], dtype=np.float32)
    heat = np.asarray(heatmap.array[0], dtype=np.float32)
    traces: list[Any] = []
    body = (img > window_hu[0]) & (img < window_hu[1]) & (img != 0)
    pts = _sample(body, max_points, rng)
    if len(pts):
        w = image.voxel_to_world(pts)
        traces.append(go.Scatter3d(
            x=w[:, 0], y=w[:, 1], z=w[:, 2], mode="markers", name="scan",
            marker={"size": 1.5, "color": "lightgray", "opacity": 0.15}, hoverinfo="skip"))
    hp = _sample(heat >= threshold, max_points // 3, rng)
    if len(hp):
        w = heatmap.voxel_to_world(hp)
        traces.append(go.Scatter3d(
            x=w[:, 0], y=w[:, 1], z=w[:, 2], mode="markers", name=f"heat map >= {threshold}",
            marker={"size": 2, "color": heat[tuple(hp.T)], "colorscale": colormap,
                    "cmin": 0.0, "cmax": 1.0, "opacity": 0.5,
                    "colorbar": {"title": "heat"}}, hoverinfo="skip"))
    for d in detections:
        x, y, z, i, j, k = _sphere(d["coordinates"], d["diameter_mm"] / 2.0)
        c = d["coordinates"]
        lps = d["coordinates_lps"]
        t = d["triage"]
        hover = (f"{d['id']}<br>RAS ({c[0]:.1f}, {c[1]:.1f}, {c[2]:.1f}) mm"
                 f"<br>LPS ({lps[0]:.1f}, {lps[1]:.1f}, {lps[2]:.1f}) mm"
                 f"<br>diameter {d['diameter_mm']:.1f} mm"
                 f"<br>volume {d['properties']['volume_mm3']:.0f} mm³"
                 f"<br>confidence {d['confidence']:.3f}"
                 f"<br>risk {t['risk_category']} ({t['malignancy_score']})")
        traces.append(go.Mesh3d(x=x, y=y, z=z, i=i, j=j, k=k, color="cyan", opacity=0.6,
                                name=str(d.get("name", d["id"])), hovertext=hover, hoverinfo="text",
                                showlegend=True))
    fig = go.Figure(data=traces)
    fig.update_layout(
        title=title or f"{len(detections)} finding(s)",
        scene={"xaxis_title": "R (mm)", "yaxis_title": "A (mm)", "zaxis_title": "S (mm)",
               "aspectmode": "data"},
        margin={"l": 0, "r": 0, "t": 40, "b": 0},
    )
    shared = plotlyjs == "shared"
    if shared:
        _write_shared_plotlyjs(Path(path).parent)
    html = fig.to_html(include_plotlyjs="directory" if shared else True, full_html=True,
                       config={"displaylogo": False, "responsive": True})
    return write_text_atomic(path, html)


#: the shared plotly.js file name that ``include_plotlyjs="directory"`` pages load
SHARED_PLOTLYJS = "plotly.min.js"


def _write_shared_plotlyjs(folder: Path) -> Path:
    """``folder/plotly.min.js`` from the installed plotly, written (atomically) if missing
    or different."""
    from plotly.offline import get_plotlyjs

    target = folder / SHARED_PLOTLYJS
    source = get_plotlyjs()
    if not target.is_file() or target.stat().st_size != len(source.encode("utf-8")):
        write_text_atomic(target, source)
    return target
