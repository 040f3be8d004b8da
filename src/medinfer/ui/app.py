"""Streamlit review UI: upload a scan, segment it (via the HTTP API or locally), review it.

Run with ``medinfer ui`` (or ``streamlit run src/medinfer/ui/app.py``). Environment:
``MEDINFER_UI_API_URL`` (default API URL), ``MEDINFER_UI_API_KEY``, ``MEDINFER_MODEL``
(model for local runs), ``MEDINFER_UI_MODE`` (``API`` or ``Local``).

Two tabs choose where the model runs: "Via API HTTP" (the service at the API URL) and
"Local" (this machine, ``MEDINFER_MODEL``). Views: the scan in three planes (axial,
coronal, sagittal; voxel axes reoriented to the closest RAS+ frame without resampling, so
a slice is one voxel layer of the source grid) with the label map overlaid in the model
card's colours (opacity slider), a per-class volume table (mL) and bar chart, the class
histogram (voxels per class, background included), a download button for the label map
(NIfTI, source grid) and the model card.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medinfer.ui.render import (
    PLANES,
    class_histogram,
    class_table,
    display_spacing,
    overlay_slice,
    physical_aspect,
    to_display_frame,
)


def _run_api(path: Path, url: str, key: str | None, workdir: Path) -> dict[str, Any]:
    from medinfer.serve.client import InferenceClient

    with InferenceClient(url, api_key=key or None, timeout=600) as client:
        card = client.model_card()
        client.submit_inference(path)
        results = client.wait_for_results(timeout=1800)
        files = client.download_results(workdir / "results")
    label_path = next(p for p in files if p.name == "label.nii.gz")
    return {"card": card, "summary": results["summary"], "label_path": label_path}


def _run_local(volume: Any, model: str, workdir: Path) -> dict[str, Any]:
    import streamlit as st

    from medinfer.io import save
    from medinfer.serve.engine import JobConfig, ModelEngine

    @st.cache_resource(show_spinner="Loading the model...")
    def engine(name: str) -> ModelEngine:
        return ModelEngine(name, "auto")

    eng = engine(model)
    prediction = eng.predict(volume, JobConfig())
    label_path = save(prediction.label, workdir / "label.nii.gz")
    return {"card": eng.card_json, "summary": prediction.summary(), "label_path": label_path}


def main() -> None:
    import streamlit as st

    from medinfer.errors import MedinferError
    from medinfer.io import load
    from medinfer.serve.client import InferenceAPIError
    from medinfer.serve.settings import load_settings
    from medinfer.serve.uploads import Limits, check_upload, load_checked

    st.set_page_config(page_title="medinfer review", layout="wide")
    st.title("medinfer review")
    state = st.session_state
    modes = ["API", "Local"]
    default_mode = os.environ.get("MEDINFER_UI_MODE", "API")
    state.setdefault("mode", default_mode if default_mode in modes else "API")
    # the UNet3D app's two tabs: run through the HTTP API, or on this machine
    tab_api, tab_local = st.tabs(["Via API HTTP", "Local"])
    with tab_api:
        api_url = st.text_input("API URL", os.environ.get("MEDINFER_UI_API_URL",
                                                          "http://127.0.0.1:8000"))
        api_key = st.text_input("API key", os.environ.get("MEDINFER_UI_API_KEY", ""),
                                type="password")
        if st.button("Run via the API"):
            state["mode"] = "API"
    with tab_local:
        model = st.text_input("Local model (checkpoint, model folder or bundled name)",
                              os.environ.get("MEDINFER_MODEL", "demo-brain"))
        if st.button("Run locally"):
            state["mode"] = "Local"
    mode = state["mode"]
    with st.sidebar:
        st.header("View")
        st.caption(f"runs: {'via API HTTP' if mode == 'API' else 'Local'}")
        opacity = st.slider("Overlay opacity", 0.0, 1.0, 0.45, 0.05)

    uploaded = st.file_uploader("Scan: NIfTI (.nii, .nii.gz) or a zip of a DICOM series",
                                type=None, accept_multiple_files=False)
    if uploaded is None:
        st.info("Upload a scan to start.")
        return
    data = uploaded.getvalue()
    digest = hashlib.sha256(data).hexdigest()[:16]
    run_key = f"{digest}:{mode}:{api_url}:{model}"
    if state.get("run_key") != run_key or st.sidebar.button("Run again"):
        settings = load_settings()
        limits = Limits(settings.max_upload_bytes, settings.max_voxels,
                        settings.max_unpacked_bytes, settings.max_archive_members)
        workdir = Path(tempfile.mkdtemp(prefix="medinfer-ui-"))
        up = workdir / "upload"
        up.write_bytes(data)
        try:
            with st.spinner("Reading the scan..."):
                scan = check_upload(up, workdir / "scan", limits, name=uploaded.name)
                volume = load_checked(scan, limits, name=uploaded.name)
            with st.spinner(f"Segmenting ({mode})..."):
                if mode == "API":
                    out = _run_api(up, api_url, api_key, workdir)
                else:
                    out = _run_local(volume, model, workdir)
            label = load(out["label_path"])
        except (MedinferError, InferenceAPIError, TimeoutError, OSError) as exc:
            state.pop("result", None)
            state["run_key"] = None
            st.error(f"{type(exc).__name__}: {exc}")
            return
        image_d, label_d = to_display_frame(volume.array[0], label.array[0], volume.affine)
        state["result"] = {"image": image_d, "label": label_d, "card": out["card"],
                           "summary": out["summary"],
                           "label_bytes": Path(out["label_path"]).read_bytes(),
                           "name": uploaded.name, "spacing": volume.spacing.tolist(),
                           "display_spacing": display_spacing(volume.affine)}
        state["run_key"] = run_key
    res = state.get("result")
    if not res:
        return
    card = res["card"]
    colors = {int(k): tuple(v.get("color", (255, 0, 0))) for k, v in card["labels"].items()}
    st.subheader(f"{res['name']} - {card['name']} {card.get('version', '')}")
    cols = st.columns(3)
    shape = res["image"].shape
    for col, (plane, axis) in zip(cols, PLANES, strict=True):
        with col:
            idx = st.slider(f"{plane} slice", 0, shape[axis] - 1, shape[axis] // 2,
                            key=f"slice-{plane}")
            rgb = overlay_slice(res["image"], res["label"], axis, idx, colors, opacity)
            rgb = physical_aspect(rgb, axis, res["display_spacing"])
            st.image(rgb, caption=f"{plane} {idx + 1}/{shape[axis]}",
                     use_container_width=True, clamp=True)
    st.subheader("Per-class volumes")
    rows = class_table(res["summary"], card)
    st.table(rows)
    st.bar_chart({r["class"]: r["volume (mL)"] for r in rows if r["value"] != 0})
    st.subheader("Class histogram")
    st.caption("voxels per class of the label map (background included)")
    st.bar_chart({r["class"]: r["voxels"] for r in class_histogram(res["summary"], card)})
    st.download_button("Download mask (label.nii.gz)", res["label_bytes"],
                       file_name="label.nii.gz", mime="application/gzip")
    with st.expander("Model card"):
        st.json(card)
    st.caption(f"voxel spacing {np.round(res['spacing'], 3).tolist()} mm; label map on the "
               "source grid")


if __name__ == "__main__":
    main()
