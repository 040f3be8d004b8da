"""Export options (windows, label PNGs, metadata), the JSON Schema file, and the CLI."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image
from slices_helpers import (
    load_pair,
    prediction_doc,
    rect,
    save,
    small_volume,
    write_json,
    write_predictions,
)

from medinfer import io
from medinfer.cli import main
from medinfer.errors import ConfigError, InvalidImageError, MedinferError
from medinfer.slices import export_slices, parse_window, prediction_schema, validate_prediction
from medinfer.volume import Volume


def test_windows() -> None:
    data = np.array([-1000.0, 0.0, 40.0, 80.0, 1000.0])
    w = parse_window("brain", data)
    assert (w.low, w.high) == (0.0, 80.0)
    np.testing.assert_array_equal(w.apply(data), [0, 0, 128, 255, 255])
    np.testing.assert_array_equal(w.apply([np.nan, np.inf, -np.inf]), [0, 255, 0])
    w = parse_window("-600,1500", data)
    assert (w.low, w.high) == (-1350.0, 150.0)
    assert parse_window("minmax", data).low == -1000.0
    auto = parse_window("auto", np.arange(1001.0))
    assert auto.low == pytest.approx(5.0) and auto.high == pytest.approx(995.0)
    for bad in ("nope", "40", "40,0", "a,b"):
        with pytest.raises(ConfigError, match="window"):
            parse_window(bad, data)


def test_image_export_metadata_and_pixels(tmp_path: Path) -> None:
    vol = small_volume()
    path = save(vol, tmp_path / "case7.nii.gz")
    res = export_slices(path, tmp_path / "png", axis="sagittal", window="40,400")
    meta = json.loads((tmp_path / "png" / "case7_export.json").read_text())
    assert meta["patient_id"] == "case7" and meta["content"] == "image"
    assert meta["source"] == str(path.resolve())
    assert meta["shape"] == list(vol.spatial_shape)
    np.testing.assert_allclose(meta["affine"], io.load(path).affine, atol=0)
    np.testing.assert_allclose(meta["spacing_mm"], vol.spacing, atol=1e-5)
    assert meta["slicing"]["axis"] == "sagittal"
    assert meta["window"]["low"] == -160.0 and meta["window"]["high"] == 240.0
    assert len(res.slice_paths) == meta["slicing"]["num_slices"] == len(meta["files"])
    png = np.array(Image.open(res.slice_paths[3]))
    assert png.dtype == np.uint8
    expected = res.mapping.to_slices(
        np.rint(np.clip((vol.channel(0) + 160.0) / 400.0, 0, 1) * 255).astype(np.uint8)
    )[3]
    np.testing.assert_array_equal(png, expected)


def test_label_export_uint16_and_errors(tmp_path: Path) -> None:
    vol = small_volume()
    lab = np.zeros(vol.spatial_shape, np.int32)
    lab[2:5, 3:6, 1:4] = 300
    lab[7, 7, 2] = 2
    path = save(Volume(lab, vol.affine), tmp_path / "seg.nii.gz")
    res = export_slices(path, tmp_path / "lab", labels=True, patient_id="case7")
    png = np.array(Image.open(res.slice_paths[2]))
    assert png.dtype == np.uint16 and set(np.unique(png)) == {0, 2, 300}
    assert res.metadata["window"] is None and res.metadata["png_dtype"] == "uint16"
    # an image export of the same patient into the label folder is refused
    img = save(vol, tmp_path / "img.nii.gz")
    with pytest.raises(ConfigError, match="another folder"):
        export_slices(img, tmp_path / "lab", patient_id="case7")
    frac = Volume(np.full(vol.spatial_shape, 0.5, np.float32), vol.affine)
    with pytest.raises(InvalidImageError, match="integer label values"):
        export_slices(frac, tmp_path / "x", labels=True, patient_id="f")
    neg = Volume(np.full(vol.spatial_shape, -1, np.int16), vol.affine)
    with pytest.raises(InvalidImageError, match="0..65535"):
        export_slices(neg, tmp_path / "x", labels=True, patient_id="f")
    two = Volume(np.zeros((2, *vol.spatial_shape), np.int16), vol.affine)
    with pytest.raises(InvalidImageError, match="2 channels"):
        export_slices(two, tmp_path / "x", patient_id="f")
    with pytest.raises(ConfigError, match="patient id"):
        export_slices(vol, tmp_path / "x", patient_id="../evil")
    with pytest.raises(ConfigError, match="needs patient_id"):
        export_slices(vol, tmp_path / "x")


def test_schema_file_is_valid_and_published() -> None:
    text = resources.files("medinfer.slices").joinpath("prediction.schema.json").read_text()
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema == prediction_schema()
    good = prediction_doc(
        "a", 0, 4, 4, [{"class_id": 1, "confidence": 0.5, "polygon": rect(0, 0, 1, 1)}]
    )
    validate_prediction(good)
    # the fast path and jsonschema agree on bad rings (booleans are not numbers)
    for ring in ([[0, True], [1, 1], [2, 2]], [[0, 1, 2]], "x", [[0, None]]):
        bad = prediction_doc("a", 0, 4, 4, [{"class_id": 1, "polygon": ring}])
        with pytest.raises(MedinferError, match="schema"):
            validate_prediction(bad)
        assert not jsonschema.Draft202012Validator(schema).is_valid(bad)
    bad_conf = prediction_doc("a", 0, 4, 4, [{"class_id": 1, "confidence": 2, "polygon": []}])
    with pytest.raises(MedinferError, match="confidence"):
        validate_prediction(bad_conf)


def test_cli_export_and_reconstruct(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, lab = load_pair("LPS")
    lab = Volume(np.ascontiguousarray(lab.channel(0)[:, :, 20:26]), lab.affine)
    scan = save(lab, tmp_path / "inference" / "cli01.nii.gz")
    with pytest.raises(SystemExit) as ex:
        main(["slices", "export", str(scan), "-o", str(tmp_path / "lab"), "--labels"])
    assert ex.value.code == 0
    pngs = sorted((tmp_path / "lab").glob("cli01_slice*.png"))
    assert len(pngs) == 6
    write_predictions(pngs[1:], tmp_path / "pred", "cli01")  # slice 0 missing
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        main(
            [
                "slices",
                "reconstruct",
                "--predictions",
                str(tmp_path / "pred"),
                "--inference-dir",
                str(tmp_path / "inference"),
                "--output",
                str(tmp_path / "masks"),
            ]
        )
    assert ex.value.code == 0
    out, err = capsys.readouterr()
    assert "cli01" in out and "1 missing" in out
    assert "medinfer: warning:" in err and "(0)" in err
    got = io.load(tmp_path / "masks" / "cli01_pred_mask.nii.gz").channel(0)
    ref = lab.channel(0).astype(np.int16).copy()
    ref[:, :, 0] = 0  # the missing slice (axial slice 0 = k 0 for this LPS grid)
    np.testing.assert_array_equal(got, ref)

    # bad input: exit code 2, one-line message on stderr
    write_json(tmp_path / "pred" / "cli01_slice0003.json", {"patient_id": "cli01"})
    with pytest.raises(SystemExit) as ex:
        main(
            [
                "slices",
                "reconstruct",
                "--predictions",
                str(tmp_path / "pred"),
                "--inference-dir",
                str(tmp_path / "inference"),
                "-o",
                str(tmp_path / "m2"),
            ]
        )
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert "medinfer: error:" in err and "cli01_slice0003.json" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as ex:
        main(["slices", "export", str(scan), "-o", str(tmp_path / "x"), "--axis", "oblique"])
    assert ex.value.code == 2
    assert "axial" in capsys.readouterr().err
