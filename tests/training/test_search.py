"""Acceptance 4: medinfer search with 3 short trials finishes, writes the best config,
and resumes its SQLite study."""

from __future__ import annotations

import csv

import yaml
from training_toy import tiny_config

from medinfer.cli import main
from medinfer.training.config import TrainConfig
from medinfer.training.search import run_search


def test_search_three_trials_best_config_and_resume(toy_data, tmp_path):
    images, labels = toy_data
    out = tmp_path / "search"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(images, labels, out, max_steps=2,
                                              val_every=1, augment=False)))
    try:
        main(["search", "--config", str(cfg), "--trials", "3"])
    except SystemExit as exc:
        assert not exc.code
    best = TrainConfig.from_yaml(out / "best_config.yaml")
    rows = list(csv.DictReader((out / "search_trials.csv").open()))
    assert len(rows) == 3 and {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    top = max((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: float(r["value"]))
    assert best.lr == float(top["lr"]) and best.max_steps == 2
    assert (out / "search.db").is_file()

    base = TrainConfig.from_yaml(cfg)
    again = run_search(base, 3)
    assert again["ran"] == 0 and again["trials"] == 3
    more = run_search(base, 4)
    assert more["ran"] == 1 and more["trials"] == 4
    assert len(list(csv.DictReader((out / "search_trials.csv").open()))) == 4
