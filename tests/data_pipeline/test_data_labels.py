"""Study labels: CSV binary / multi-label, JSON multi-class; errors name file, line, value."""

import json

import numpy as np
import pytest

from medinfer.data import LabelKind, load_study_labels
from medinfer.errors import ConfigError


def test_csv_binary(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("study,hemorrhage\nct00,1\nct01,false\nct02,Yes\n")
    labels = load_study_labels(p)
    assert labels.kind is LabelKind.BINARY and labels.names == ("hemorrhage",)
    assert labels.get("ct00") == np.float32(1) and labels.get("ct01") == np.float32(0)
    assert labels.get("ct02").dtype == np.float32 and labels.get("nope") is None


def test_csv_multilabel_keeps_column_order(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("fracture,study,ich,mass\n0,ct00,1,1\n1,ct01,0,0\n")
    labels = load_study_labels(p, kind="multilabel", study_column="study")
    assert labels.names == ("fracture", "ich", "mass")
    assert labels.get("ct00").tolist() == [0.0, 1.0, 1.0]
    assert labels.get("ct01").dtype == np.float32


def test_json_multiclass_names_sorted_or_given(tmp_path):
    p = tmp_path / "labels.json"
    p.write_text(json.dumps({"ct00": "normal", "ct01": "ich", "mr00": "tumour"}))
    labels = load_study_labels(p)
    assert labels.kind is LabelKind.MULTICLASS and labels.names == ("ich", "normal", "tumour")
    assert int(labels.get("ct00")) == 1 and labels.get("ct00").dtype == np.int64
    p.write_text(json.dumps({"classes": ["normal", "ich"], "labels": {"a": "ich", "b": 0}}))
    labels = load_study_labels(p)
    assert labels.names == ("normal", "ich") and labels.values == {"a": 1, "b": 0}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.csv", "study,x\nct00,1.5\n", "study 'ct00' has '1.5'; expected 0/1"),
        ("a.csv", "study,x,y\nct00,1,2\n", "column 'y'.*'2' is not a binary label"),
        ("a.csv", "study,x\nct00,1,0\n", "line 2: 3 values, the header has 2"),
        ("a.csv", "study,x\nct00,1\nct00,0\n", "listed twice"),
        ("a.csv", "study,x\nct00,\n", "empty value"),
        ("a.json", '{"classes": ["a"], "labels": {"s": 3}}', "outside 0..0"),
        ("a.json", '{"s": 1.5}', "expected a class name or index"),
        ("a.json", "[1, 2]", "expected a JSON object"),
        ("a.txt", "", "expected '.csv' or '.json'"),
    ],
)
def test_bad_label_files(tmp_path, name, text, message):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_study_labels(p)


def test_kind_mismatch(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("study,x\nct00,1\n")
    with pytest.raises(ConfigError, match="holds binary labels, not multiclass"):
        load_study_labels(p, kind="multiclass")


def test_csv_first_column_is_the_study_whatever_its_header(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("study_id,label_a,label_b,label_c\npatient_001,1,0,1\npatient_002,0,1,0\n")
    labels = load_study_labels(p)
    assert labels.kind is LabelKind.MULTILABEL and labels.names == ("label_a", "label_b", "label_c")
    assert labels.get("patient_001").tolist() == [1.0, 0.0, 1.0]
    p.write_text("id,x\nct00,1\n")
    assert load_study_labels(p).get("ct00") == np.float32(1)
    with pytest.raises(ConfigError, match="no 'study' column"):
        load_study_labels(p, study_column="study")


def test_csv_single_column_of_class_indices_is_multiclass(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("study_id,grade\na,0\nb,2\nc,1\n")
    labels = load_study_labels(p)
    assert labels.kind is LabelKind.MULTICLASS and labels.names == ("0", "1", "2")
    assert labels.get("b").dtype == np.int64 and int(labels.get("b")) == 2
