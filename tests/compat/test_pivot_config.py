"""The PIVOT inference configuration (``docs/compat/pivot.md``) is accepted as written.

The nine YAML snippets of the PIVOT description live verbatim in ``tests/data/compat/pivot``
(DATA_NOTICE.md). Each parses; the complete ``configs/inference.yaml`` translates to the
native keys listed in the compat table; run on a CT with inserted lesions, the PIVOT
spelling and the native spelling give identical findings.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from medinfer.detection import (
    augmentations,
    inference_settings,
    open_detection_model,
    performance_notice,
    run_detection_on_volume,
)
from medinfer.errors import ConfigError
from medinfer.postprocess.detection_config import DetectionConfig, load_detection_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _compat_data import small_ct

DATA = Path(__file__).resolve().parents[1] / "data"
PIVOT = DATA / "compat" / "pivot"
COMPLETE = PIVOT / "05_inference_complete.yaml"


def _dump(cfg: DetectionConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def test_all_nine_snippets_parse() -> None:
    files = sorted(PIVOT.glob("*.yaml"))
    assert len(files) == 9
    for f in files:
        assert isinstance(load_detection_config(f), DetectionConfig), f


def test_complete_config_maps_to_native_keys() -> None:
    cfg = load_detection_config(COMPLETE)
    native = DetectionConfig.from_dict({
        "model": {"checkpoint": "checkpoints/best_model.pth", "architecture": "unet",
                  "device": "cuda", "mixed_precision": True},
        "input": {"target_spacing": [1.0, 1.0, 1.0], "hu_clip": [-1000, 400],
                  "normalization": {"method": "ct_window", "min_hu": -1000, "max_hu": 400}},
        "inference": {"mode": "sliding_window", "patch_size": [128, 128, 128],
                      "stride": [64, 64, 64], "batch_size": 4, "blending": "gaussian",
                      "sigma_scale": 0.125, "tta": {"enabled": False, "num_augmentations": 8}},
        "post_processing": {"threshold": 0.5, "min_distance_mm": 10, "peak_method": "local_maxima",
                            "nms_enabled": True, "nms_iou": 0.3, "min_diameter_mm": 3.0,
                            "max_diameter_mm": 30.0, "min_confidence": 0.3},
        "output": {"formats": ["json", "heatmap", "png", "pdf"]},
        "visualization": {"num_slices": 5, "colormap": "hot", "alpha": 0.5},
    })
    assert _dump(cfg) == _dump(native)


def test_snippets_mean_what_they_say() -> None:
    blend = load_detection_config(PIVOT / "02_blending.yaml").inference
    assert blend.blending is not None and blend.blending.value == "gaussian"
    assert blend.sigma_scale == 0.125
    tta = load_detection_config(PIVOT / "04_tta.yaml")
    augs = augmentations(tta)
    assert len(augs) == 7  # identity + the six named ones (num_augmentations 8 keeps all)
    assert augs[4:] == [((), 1, (0, 1)), ((), 1, (0, 2)), ((), 1, (1, 2))]
    gpu = load_detection_config(PIVOT / "06_gpu_acceleration.yaml")
    assert gpu.model.device == "cuda" and gpu.model.mixed_precision
    assert gpu.inference.cudnn_benchmark is True
    note = performance_notice(gpu, "cpu")
    assert note is not None and "mixed_precision" in note and "cudnn_benchmark" in note
    assert performance_notice(gpu, "cuda") is None
    batch = load_detection_config(PIVOT / "07_batch_processing.yaml").inference
    assert (batch.batch_size, batch.num_workers, batch.prefetch_factor) == (8, 8, 2)
    mem = load_detection_config(PIVOT / "08_memory_optimization.yaml").inference
    assert mem.stride == (80, 80, 80) and mem.clear_cache is True
    # stride with a consistent overlap (snippet 01) is accepted; an inconsistent one is not
    sw = load_detection_config(PIVOT / "01_sliding_window.yaml")
    card, _ = _demo()
    assert inference_settings(card, sw)["overlap"] == (0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match="inconsistent"):
        DetectionConfig.from_dict({"inference": {"patch_size": [128, 128, 128],
                                                 "stride": [64, 64, 64], "overlap": 0.25}})


@pytest.mark.parametrize(("text", "key"), [
    ("post_processing:\n  nms:\n    enabled: true\n    iou: 0.3\n", "post_processing.nms.iou"),
    ("inference:\n  blending:\n    method: gaussian\n    width: 2\n", "inference.blending.width"),
    ("output:\n  formats:\n    detections: xml\n", "output.formats.detections"),
    ("output:\n  save_heatmap: true\n  save_everything: true\n", "output.save_everything"),
    ("input:\n  normalization_method: robust\n", "input.normalization_method"),
    ("visualization:\n  overlay_alpha: 0.5\n  colour: red\n", "visualization.colour"),
])
def test_unknown_keys_still_fail_with_the_dotted_key(tmp_path: Path, text: str,
                                                     key: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_detection_config(p)


def test_output_switches_and_formats() -> None:
    cfg = DetectionConfig.from_dict({
        "output": {"save_heatmap": True, "save_visualization": False,
                   "formats": {"detections": "both", "heatmap": "numpy"}},
        "visualization": {"save_3d": True}})
    assert [f.value for f in cfg.output.formats] == ["json", "csv", "heatmap_npy", "html"]


def _demo() -> tuple[Any, Any]:
    from medinfer.models import load_model, resolve_model

    card, folder = resolve_model("demo-nodules")
    return card, load_model(card, folder, "cpu")


def test_complete_config_gives_the_native_findings(caplog: pytest.LogCaptureFixture,
                                                   tmp_path: Path) -> None:
    """The complete config, PIVOT spelling, with values suited to the demo model (its
    spacing, HU window and a 64^3 window) against the same settings spelled natively."""
    raw = yaml.safe_load(COMPLETE.read_text())
    pivot = copy.deepcopy(raw)
    pivot["model"].update(checkpoint="demo-nodules", device="cpu")
    pivot["input"].update(spacing=[1.5, 1.5, 1.5], clip_range=[-20, 180])
    pivot["inference"].update(patch_size=[64, 64, 64], stride=[32, 32, 32])
    pivot["post_processing"]["peak_detection"]["min_distance"] = 5
    native = {
        "model": {"checkpoint": "demo-nodules", "architecture": "unet", "device": "cpu",
                  "mixed_precision": True},
        "input": {"target_spacing": [1.5, 1.5, 1.5], "hu_clip": [-20, 180],
                  "normalization": {"method": "ct_window", "min_hu": -20, "max_hu": 180}},
        "inference": {"mode": "sliding_window", "patch_size": [64, 64, 64],
                      "overlap": 0.5, "batch_size": 4, "blending": "gaussian",
                      "sigma_scale": 0.125,
                      "tta": {"enabled": False, "num_augmentations": 8}},
        "post_processing": {"threshold": 0.5, "min_distance_mm": 5, "nms_iou": 0.3,
                            "min_diameter_mm": 3.0, "max_diameter_mm": 30.0,
                            "min_confidence": 0.3},
    }
    from medinfer.io import load

    lesions = small_ct(tmp_path / "ct.nii.gz")
    image = load(tmp_path / "ct.nii.gz")
    found = []
    for data in (pivot, native):
        cfg = DetectionConfig.from_dict(data)
        card, net = open_detection_model(None, cfg, "cpu")
        with caplog.at_level(logging.WARNING, logger="medinfer.detection"):
            found.append(run_detection_on_volume(image, card, net, cfg).detections)
    assert found[0] == found[1]
    assert "mixed_precision has no effect on device cpu" in caplog.text
    # and they are the inserted lesions
    centres = np.array([d["coordinates"] for d in found[0]]).reshape(-1, 3)
    hits = sum(bool(len(centres)) and
               float(np.min(np.linalg.norm(centres - centre, axis=1))) <= diam / 2
               for centre, diam in lesions)
    assert hits == 2, (found[0], lesions)
