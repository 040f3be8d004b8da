"""Acceptance 1: a toy run killed with SIGKILL resumes to the same steps and losses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from training_toy import tiny_config

from medinfer.training import train

MEDINFER = str(Path(sys.executable).with_name("medinfer"))


def _log(out: Path) -> list[dict[str, object]]:
    p = out / "training_log.json"
    return json.loads(p.read_text()) if p.is_file() else []


def test_sigkill_then_resume_equals_uninterrupted_run(toy_data, tmp_path):
    images, labels = toy_data
    steps = 8
    ref = train(tiny_config(images, labels, tmp_path / "ref", max_steps=steps), export=False)
    assert [r["step"] for r in ref.log] == list(range(1, steps + 1))

    out = tmp_path / "killed"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(images, labels, out, max_steps=steps,
                                              checkpoint_every=2)))
    # the training process SIGKILLs itself right after step 5 (no race with a poller):
    # its last checkpoint is step 4, step 5 is lost and must be recomputed
    script = (
        "import os, signal, sys\n"
        "from medinfer.training import train\n"
        "from medinfer.training.config import TrainConfig\n"
        "def cb(step, loss, metric):\n"
        "    if step == 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "train(TrainConfig.from_yaml(sys.argv[1]), callback=cb)\n")
    killed = subprocess.run([sys.executable, "-c", script, str(cfg)], capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]
    assert (out / "checkpoints" / "last.pt").is_file()
    assert not (out / "model.yaml").exists()

    cmd = [MEDINFER, "train", "--config", str(cfg)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = _log(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref.log],
                               rtol=1e-6, atol=0)
    np.testing.assert_allclose([r["val_metric"] or -1 for r in rows],
                               [r["val_metric"] or -1 for r in ref.log], rtol=1e-6)
    assert (out / "model.yaml").is_file() and (out / "model.onnx").is_file()
    split = json.loads((out / "split.json").read_text())
    assert sorted(split["train"] + split["validation"]) == ["case0", "case1"]
