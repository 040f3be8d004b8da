"""Batch runner: reads ahead and writes behind while a case is inferred; order; errors."""

from __future__ import annotations

import threading

import pytest

from medinfer.inference.batch import run_batch


def test_overlap_order_and_results() -> None:
    started_load = {i: threading.Event() for i in range(4)}
    started_write = {i: threading.Event() for i in range(4)}
    seen: dict[str, bool] = {}
    log: list[tuple[str, int]] = []
    lock = threading.Lock()

    def load(i: int) -> int:
        started_load[i].set()
        with lock:
            log.append(("load", i))
        return i * 10

    def infer(i: int, v: int) -> int:
        # while case i is inferred, case i+1 is read and case i-1 is written
        if i + 1 < 4:
            seen[f"read{i + 1}"] = started_load[i + 1].wait(20)
        if i >= 1:
            seen[f"write{i - 1}"] = started_write[i - 1].wait(20)
        return v + 1

    def write(i: int, v: int, p: int) -> str:
        started_write[i].set()
        with lock:
            log.append(("write", i))
        return f"{i}:{v}:{p}"

    done: list[int] = []
    out = run_batch([0, 1, 2, 3], load, infer, write, on_done=lambda i, c, r: done.append(i))
    assert out == ["0:0:1", "1:10:11", "2:20:21", "3:30:31"]
    assert done == [0, 1, 2, 3]
    assert all(seen.values()) and len(seen) == 6, seen
    assert [i for k, i in log if k == "write"] == [0, 1, 2, 3]


def test_error_stops_and_finishes_pending_write() -> None:
    written: list[int] = []

    def infer(i: int, v: int) -> int:
        if i == 2:
            raise ValueError("bad case 2")
        return v

    with pytest.raises(ValueError, match="bad case 2"):
        run_batch([0, 1, 2, 3], lambda i: i, infer, lambda i, v, p: written.append(i))
    assert written == [0, 1]


def test_load_error_and_empty() -> None:
    def load(i: int) -> int:
        if i == 1:
            raise OSError("unreadable")
        return i

    with pytest.raises(OSError, match="unreadable"):
        run_batch([0, 1], load, lambda i, v: v, lambda i, v, p: i)
    assert run_batch([], load, lambda i, v: v, lambda i, v, p: i) == []


def test_open_predictor_card_streams_by_default(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    import torch
    import yaml

    from medinfer.errors import ConfigError
    from medinfer.formats import open_predictor
    from medinfer.inference import Predictor
    from medinfer.inference.batch import StreamingPredictor
    from medinfer.volume import Volume

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1)).eval()
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 1, 8, 8, 8)), str(tmp_path / "m.ts"))
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "labels": {i: {"name": f"c{i}"} for i in range(4)},
        "input": {"orientation": "LPS", "spacing": [1.5, 1.5, 2.0]},
        "inference": {"patch_size": [8, 8, 8], "overlap": 0.25},
        "weights": {"format": "torchscript", "file": "m.ts"},
    }))
    card, pred = open_predictor(str(tmp_path), device="cpu")
    assert isinstance(pred, StreamingPredictor) and card.name == "tiny"
    _, full = open_predictor(str(tmp_path), device="cpu", stream=False)
    assert isinstance(full, Predictor)
    rng = np.random.default_rng(0)
    aff = np.diag([0.9, 1.1, 2.5, 1.0])
    vol = Volume(rng.normal(size=(20, 17, 9)).astype(np.float32), aff, {})
    assert np.array_equal(pred.predict(vol).label.array, full.predict(vol).label.array)
    with pytest.raises(ConfigError, match="nnU-Net model folders only"):
        open_predictor(str(tmp_path), checkpoint="best")
