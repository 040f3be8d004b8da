"""ModelCard validation: valid cards parse, every bad field is named in the error."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from medinfer.errors import ModelError
from medinfer.models import Activation, Blending, InferenceMode, ModelCard, Task, WeightFormat

BASE: dict[str, Any] = {
    "name": "tiny",
    "version": "1.0",
    "task": "segmentation",
    "description": "test card",
    "labels": {
        0: {"name": "background", "color": [0, 0, 0]},
        1: {"name": "csf", "color": [0, 0, 255], "snomed": "91722005"},
        2: {"name": "grey matter", "color": [0, 255, 0]},
    },
    "input": {
        "modality": "MR",
        "channels": 1,
        "orientation": "LPS",
        "spacing": [1.0, 1.2, 2.5],
        "normalization": {"method": "percentile", "lower": 0.5, "upper": 99.5, "nonzero": True},
    },
    "inference": {
        "mode": "sliding_window",
        "patch_size": [32, 32, 16],
        "overlap": 0.25,
        "blending": "gaussian",
        "sigma_scale": 0.125,
        "tta_axes": [2, 0],
        "batch_size": 2,
    },
    "output": {"activation": "softmax"},
    "weights": {"format": "state_dict", "file": "model.pt"},
    "architecture": {"network": "UNet", "kwargs": {"spatial_dims": 3}},
    "provenance": {"data": "synthetic"},
    "license": "CC-BY-4.0",
}


def _card(**changes: Any) -> dict[str, Any]:
    d = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        keys = dotted.split("__")
        node = d
        for k in keys[:-1]:
            node = node[int(k) if k.isdigit() and isinstance(node, dict) and int(k) in node else k]
        last = keys[-1]
        last_key: Any = int(last) if last.isdigit() else last
        if value is _DELETE:
            del node[last_key]
        else:
            node[last_key] = value
    return d


_DELETE = object()


def test_valid_card_parses_with_types(tmp_path: Path) -> None:
    p = tmp_path / "model.yaml"
    p.write_text(yaml.safe_dump(BASE))
    card = ModelCard.from_yaml(p)
    assert card.task is Task.SEGMENTATION
    assert card.labels[2].color == (0, 255, 0)
    assert card.labels[1].snomed == "91722005"
    assert card.input.orientation == "LPS"
    assert card.input.spacing == (1.0, 1.2, 2.5)
    assert card.inference.mode is InferenceMode.SLIDING_WINDOW
    assert card.inference.blending is Blending.GAUSSIAN
    assert card.inference.tta_axes == (0, 2)
    assert card.output.activation is Activation.SOFTMAX
    assert card.weights.format is WeightFormat.STATE_DICT
    assert card.num_classes == 3
    assert card.colors()[1] == (0, 0, 255)


def test_enum_values_are_case_insensitive() -> None:
    card = ModelCard.from_dict(_card(inference__blending="Constant", task="DETECTION",
                                     output={"activation": "sigmoid"}))
    assert card.inference.blending is Blending.CONSTANT
    assert card.task is Task.DETECTION
    assert card.num_classes == 1


@pytest.mark.parametrize(
    ("changes", "field", "hint"),
    [
        ({"labels__2__color": [300, 0, 0]}, "labels.2.color", "0..255"),
        ({"labels__1__snomed": "abc"}, "labels.1.snomed", "SNOMED"),
        ({"task": "classification"}, "task", "'segmentation', 'detection'"),
        ({"inference__blending": "cosine"}, "inference.blending", "'gaussian', 'constant'"),
        ({"inference__mode": "tiles"}, "inference.mode", "'sliding_window'"),
        ({"inference__overlap": 1.0}, "inference.overlap", "less than 1"),
        ({"inference__overlap": -0.1}, "inference.overlap", "greater than or equal"),
        ({"inference__tta_axes": [3]}, "inference.tta_axes", "0, 1, 2"),
        ({"inference__patch_size": [32, 32]}, "inference.patch_size", ""),
        ({"input__orientation": "RAR"}, "input.orientation", "orientation code"),
        ({"input__spacing": [1.0, 0.0, 1.0]}, "input.spacing", "(0, 100)"),
        ({"input__normalization": {"method": "magic"}}, "input.normalization", "ct_window"),
        ({"input__normalization": {"method": "ct_window"}}, "input.normalization", "min_hu"),
        ({"output__activation": "relu"}, "output.activation", "'softmax', 'sigmoid'"),
        ({"weights__format": "pickle"}, "weights.format", "'torchscript', 'onnx', 'state_dict'"),
        ({"weights__file": "../../etc/passwd"}, "weights.file", "inside the model folder"),
        ({"architecture__network": "ResNet"}, "architecture.network", "'UNet'"),
        ({"architecture": _DELETE}, "architecture", "required"),
        ({"labels": {1: {"name": "a"}, 3: {"name": "b"}}}, "labels", "0..K-1"),
        ({"colour_scheme": "x"}, "colour_scheme", "unknown field"),
        ({"name": _DELETE}, "name", "Field required"),
    ],
)
def test_bad_field_is_named(changes: dict[str, Any], field: str, hint: str) -> None:
    with pytest.raises(ModelError) as info:
        ModelCard.from_dict(_card(**changes))
    msg = str(info.value)
    assert f"{field}: " in msg or f"{field}." in msg, msg
    assert hint in msg, msg


def test_not_yaml_and_not_mapping(tmp_path: Path) -> None:
    p = tmp_path / "model.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ModelError, match="not valid YAML"):
        ModelCard.from_yaml(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ModelError, match="mapping"):
        ModelCard.from_yaml(p)
    with pytest.raises(ModelError, match="not found"):
        ModelCard.from_yaml(tmp_path / "missing.yaml")


def test_every_field_is_documented() -> None:
    """docs/model_card.md names every field of the schema (dotted paths)."""
    from pydantic import BaseModel

    doc = (Path(__file__).resolve().parents[2] / "docs" / "model_card.md").read_text()

    def fields(model: type[BaseModel], prefix: str) -> list[str]:
        out = []
        for name, info in model.model_fields.items():
            path = f"{prefix}{name}"
            out.append(path)
            ann = info.annotation
            if getattr(ann, "__origin__", None) is dict:
                continue
            for sub in getattr(ann, "__args__", (ann,)):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    out.extend(fields(sub, path + "."))
        return out

    from medinfer.models.card import LabelSpec

    names = fields(ModelCard, "") + [f"labels.N.{f}" for f in LabelSpec.model_fields]
    missing = [n for n in names if f"`{n}`" not in doc]
    assert not missing, missing
