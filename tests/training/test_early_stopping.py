"""Acceptance 2: early stopping stops at the documented step; patience from model.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from training_toy import tiny_config

from medinfer.errors import ConfigError
from medinfer.training import EarlyStopping, train
from medinfer.training.config import TrainConfig
from medinfer.training.loop import resolve_patience

ZOO = Path(__file__).resolve().parents[2] / "src/medinfer/models/zoo/demo-brain/model.yaml"
#: scripted validation metrics: best at validation 2, then 3 without improvement
SCRIPT = [0.10, 0.30, 0.30, 0.20, 0.25, 0.90, 0.95]


def _card(tmp_path: Path, patience: int) -> Path:
    data = yaml.safe_load(ZOO.read_text())
    data["training"] = {"early_stopping": {"patience": patience}}
    p = tmp_path / "model.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_early_stopping_rule():
    es = EarlyStopping(patience=3)
    stops = [es.step(m) for m in SCRIPT]
    assert stops.index(True) == 4          # the 5th validation: 3 without improvement
    es = EarlyStopping(patience=2, min_delta=0.05)
    assert [es.step(m) for m in (0.5, 0.54, 0.53)] == [False, False, True]
    assert not any(EarlyStopping(None).step(m) for m in SCRIPT)
    with pytest.raises(ConfigError, match="patience"):
        EarlyStopping(0)


def test_train_stops_at_documented_step_with_patience_from_model_yaml(toy_data, tmp_path):
    images, labels = toy_data
    card = _card(tmp_path, patience=3)
    cfg = TrainConfig.from_mapping(tiny_config(
        images, labels, tmp_path / "out", max_steps=40, val_every=2, model_card=str(card)))
    assert resolve_patience(cfg) == 3
    seen: list[int] = []

    def scripted(net, step):
        seen.append(step)
        return SCRIPT[len(seen) - 1]

    result = train(cfg, validator=scripted, export=False)
    # validations at steps 2, 4, 6, 8, 10: the 5th (step 10) is the 3rd without improvement
    assert seen == [2, 4, 6, 8, 10]
    assert result.stopped_early and result.steps == 10
    assert result.best_step == 4 and result.best_metric == pytest.approx(0.30)
    assert [r["step"] for r in result.log] == list(range(1, 11))
    assert (tmp_path / "out" / "checkpoints" / "best.pt").is_file()
    # the config's own patience wins over the card's
    cfg2 = TrainConfig.from_mapping(tiny_config(images, labels, tmp_path / "o2",
                                                patience=1, model_card=str(card)))
    assert resolve_patience(cfg2) == 1
