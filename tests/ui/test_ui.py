"""Acceptance 6: the Streamlit UI in headless Chromium (Debian chromium via Playwright):
upload the bundled sample, run it through the API, see the overlay images and the class
table; a screenshot is saved under the test's tmp folder. Plus unit tests of rendering."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from _serve_support import (
    DEMO_MODEL,
    REPO,
    SAMPLE_T1,
    Server,
    free_port,
    oblique_affine,
)

from medinfer.ui.render import (
    class_histogram,
    class_table,
    display_spacing,
    overlay_slice,
    physical_aspect,
    to_display_frame,
)

CHROMIUM = "/usr/bin/chromium"


def test_display_frame_and_overlay_colours() -> None:
    aff = oblique_affine()  # axes 0, 1 flipped (L, P), oblique
    image = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    label = np.zeros((4, 5, 3), np.uint8)
    label[0, 0, 0] = 2
    img_d, lab_d = to_display_frame(image, label, aff)
    assert img_d.shape == (4, 5, 3)
    assert lab_d[3, 4, 0] == 2  # flipped along both in-plane axes
    assert img_d[3, 4, 0] == image[0, 0, 0]
    rgb = overlay_slice(img_d, lab_d, axis=2, index=0, colors={2: (0, 255, 0)}, opacity=1.0,
                        window=(0.0, 100.0))
    assert rgb.shape == (5, 4, 3) and rgb.dtype == np.uint8
    green = np.argwhere((rgb == [0, 255, 0]).all(axis=-1))
    assert green.tolist() == [[0, 3]]  # anterior up, right to the right
    half = overlay_slice(img_d, lab_d, 2, 0, {2: (0, 255, 0)}, 0.5, window=(0.0, 100.0))
    assert 100 < int(half[0, 3, 1]) < 255
    sp = display_spacing(aff)  # spacing (1.3, 0.9, 2.1) stays with its axes
    np.testing.assert_allclose(sp, (1.3, 0.9, 2.1))
    square = physical_aspect(rgb, 2, sp)  # axial: columns R (1.3 mm), rows A (0.9 mm)
    assert square.shape == (5, round(4 * 1.3 / 0.9), 3)
    coronal = physical_aspect(overlay_slice(img_d, lab_d, 1, 0, {}, 0.5), 1, sp)
    assert coronal.shape == (round(3 * 2.1 / 1.3), 4, 3)


def test_class_table_lists_every_foreground_label() -> None:
    card = {"labels": {"0": {"name": "background"}, "1": {"name": "csf"},
                       "2": {"name": "gm"}}}
    summary = {"labels": [{"value": 2, "name": "gm", "voxels": 10, "volume_ml": 0.0123}]}
    assert class_table(summary, card) == [
        {"value": 1, "class": "csf", "voxels": 0, "volume (mL)": 0.0},
        {"value": 2, "class": "gm", "voxels": 10, "volume (mL)": 0.012},
    ]
    assert class_histogram({**summary, "shape": [4, 5, 6]}, card) == [
        {"value": 0, "class": "background", "voxels": 110},
        {"value": 1, "class": "csf", "voxels": 0},
        {"value": 2, "class": "gm", "voxels": 10},
    ]


@contextlib.contextmanager
def _streamlit(env: dict[str, str], log: Path) -> Iterator[str]:
    port = free_port()
    full = dict(os.environ)
    full.update(env)
    full.update({"OMP_NUM_THREADS": "1", "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"})
    cmd = [sys.executable, "-m", "medinfer.cli", "ui", "--host", "127.0.0.1",
           "--port", str(port)]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, env=full, stdout=fh, stderr=subprocess.STDOUT,
                                cwd=str(REPO))
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"streamlit exited: {log.read_text()[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/_stcore/health", timeout=2).status_code == 200:
                        break
                time.sleep(0.3)
            else:
                raise TimeoutError("streamlit did not start")
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_ui_in_headless_chromium(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).is_file(), "Debian chromium is required (apt-get install chromium)"
    api = Server({"MEDINFER_MODEL": DEMO_MODEL, "MEDINFER_JOB_STORE": str(tmp_path / "store"),
                  "MEDINFER_API_KEYS": "ui-key"}, tmp_path / "api.log")
    try:
        api.wait_ready()
        env = {"MEDINFER_UI_API_URL": api.url, "MEDINFER_UI_API_KEY": "ui-key",
               "MEDINFER_UI_MODE": "API"}
        with _streamlit(env, tmp_path / "streamlit.log") as url, sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1800})
                page.goto(url, timeout=120_000)
                page.locator("input[type=file]").set_input_files(str(SAMPLE_T1),
                                                                 timeout=120_000)
                table = page.locator("table").first
                expect(table).to_contain_text("white matter", timeout=240_000)
                for name in ("cerebrospinal fluid", "grey matter", "white matter"):
                    expect(table).to_contain_text(name)
                expect(page.get_by_text(f"- {DEMO_MODEL}")).to_be_visible()
                images = page.locator("[data-testid=stImage] img")
                expect(images).to_have_count(3, timeout=60_000)
                for i in range(3):
                    box = images.nth(i).bounding_box()
                    assert box is not None and box["width"] > 50 and box["height"] > 50
                    assert images.nth(i).evaluate("el => el.naturalWidth") > 50
                # the rest of the page follows the charts (slow on shared CPUs)
                expect(page.get_by_text("Download mask (label.nii.gz)")).to_be_visible(
                    timeout=60_000)
                # the UNet3D app's tabs and class histogram
                expect(page.get_by_role("tab", name="Via API HTTP")).to_be_visible()
                expect(page.get_by_role("tab", name="Local")).to_be_visible()
                expect(page.get_by_text("Class histogram")).to_be_visible(timeout=60_000)
                expect(page.get_by_text("Model card")).to_be_visible()
                shot = tmp_path / "ui.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                # the error path: a non-image upload shows a message, no crash
                bad = tmp_path / "notes.txt"
                bad.write_text("not a scan\n" * 100)
                page.locator("input[type=file]").set_input_files(str(bad))
                expect(page.get_by_text("UnsupportedFormatError")).to_be_visible(
                    timeout=60_000)
            finally:
                browser.close()
    finally:
        api.stop()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
