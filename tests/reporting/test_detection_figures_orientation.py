"""Detection figures are drawn radiologically in world orientation (issue 17 item 4).

The same lesion in a RAS-stored and an LPS-stored copy of one scan must give the same
``_visualization.png`` and PDF key-image pixels, with the lesion on the screen's left for
a lesion on the patient's right (radiological convention of reporting/overlay.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medinfer.reporting.detection_figures import finding_crops_png, write_visualization_png
from medinfer.volume import Volume


def _scan_pair(
    centre: tuple[float, float, float] = (7.2, 4.0, 0.0),
) -> tuple[tuple[Volume, Volume], tuple[Volume, Volume], np.ndarray]:
    """(RAS image, LPS image), (RAS heat map, LPS heat map), lesion centre (RAS mm)."""
    shape = (40, 36, 12)
    spacing = (0.8, 0.8, 2.5)
    ras = np.diag([*spacing, 1.0])
    ras[:3, 3] = [-16.0, -14.0, -15.0]
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = ijk * np.array(spacing) + ras[:3, 3]
    centre_ = np.array(centre)
    dist = np.linalg.norm(world - centre_, axis=-1)
    img = np.where(dist < 5.0, 150.0, 0.0) + 40.0 * (world[..., 1] > 8)  # lesion + "tissue"
    heat = np.clip(1.0 - dist / 8.0, 0.0, 1.0)
    # LPS storage: voxel axes i and j reversed (same world geometry)
    lps = ras @ np.array([[-1, 0, 0, shape[0] - 1], [0, -1, 0, shape[1] - 1], [0, 0, 1, 0],
                          [0, 0, 0, 1.0]])
    flip = (slice(None, None, -1), slice(None, None, -1), slice(None))
    images = (Volume(img[None].astype(np.float32), ras),
              Volume(img[flip][None].astype(np.float32), lps))
    heats = (Volume(heat[None].astype(np.float32), ras),
             Volume(heat[flip][None].astype(np.float32), lps))
    assert np.allclose(images[1].voxel_to_world([[shape[0] - 1, shape[1] - 1, 0]]), ras[:3, 3])
    return images, heats, centre_


def _detection(vol: Volume, centre: np.ndarray) -> dict[str, Any]:
    vox = np.linalg.solve(vol.affine, np.append(centre, 1.0))[:3]
    return {"id": 1, "name": "F01", "coordinates": centre.tolist(),
            "coordinates_voxel": [int(round(v)) for v in vox],
            "coordinates_voxel_continuous": vox.tolist(), "diameter_mm": 10.0,
            "confidence": 0.9}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def test_ras_and_lps_storage_give_the_same_figures(tmp_path: Path) -> None:
    images, heats, centre = _scan_pair()
    figs, crops = [], []
    for n, (img, heat) in enumerate(zip(images, heats, strict=True)):
        det = _detection(img, centre)
        figs.append(write_visualization_png(tmp_path / f"v{n}.png", img, heat, [det],
                                            window_hu=(0.0, 200.0), dpi=60))
        crops.append(finding_crops_png(tmp_path / f"c{n}.png", img, det, (0.0, 200.0), dpi=60))
    a, b = _pixels(figs[0]), _pixels(figs[1])
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1  # same picture (interpolation rounding at most)
    ca, cb = _pixels(crops[0]), _pixels(crops[1])
    assert ca.shape == cb.shape and np.abs(ca - cb).max() <= 1
    with Image.open(figs[0]) as im:
        assert im.info["Description"] == "F01:axial:S=0.00"


def _red_centre(path: Path) -> tuple[float, float]:
    rgb = _pixels(path)
    # the hot colormap over the lesion: red, not the yellow orientation letters
    red = (rgb[..., 0] - rgb[..., 1] > 60) & (rgb[..., 0] - rgb[..., 2] > 60)
    rows, cols = np.nonzero(red)
    assert rows.size > 20
    return float(rows.mean()), float(cols.mean())


def test_lesion_on_patient_right_is_on_screen_left_anterior_up(tmp_path: Path) -> None:
    # RAS+: +x points to the patient's right; radiological display puts it on the left
    # (LPS storage gives the same pixels: the test above)
    where = {}
    for name, c in (("right_ant", (7.2, 4.0, 0.0)), ("left_post", (-7.2, -4.0, 0.0))):
        images, heats, centre = _scan_pair(c)
        out = write_visualization_png(tmp_path / f"{name}.png", images[1], heats[1],
                                      [_detection(images[1], centre)],
                                      window_hu=(0.0, 200.0), dpi=60)
        where[name] = _red_centre(out)
    assert where["right_ant"][1] < where["left_post"][1] - 5  # right -> screen left
    assert where["right_ant"][0] < where["left_post"][0] - 3  # anterior -> up
